"""The table of benchmarked loss methods: one ``Method`` entry per method.

Adding a method is adding one entry to ``METHODS``: the fastpref function name and keyword
arguments, the eager blocks it is compared with (provider name -> block and its keyword
arguments, with β translated to each trainer's convention), which eager block the
``compile`` providers compile, and which extra inputs (timesteps, labels, embeddings) the
call needs. Methods that the installed fastpref lacks are skipped with a printed note by the
drivers (``providers.fastpref_fn`` returns ``None`` for them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import reference_blocks as rb


@dataclass(frozen=True)
class Method:
    """One benchmarked loss method.

    name: the CSV ``kernel_name``; fastpref: attribute name in the ``fastpref`` package;
    fastpref_kwargs: its keyword arguments; eager: provider -> (block, kwargs);
    compile_base: the eager provider whose block the compile providers compile;
    uses_ref: whether ``ref_pred`` is an input; extra: builds extra positional tensors from
    (B, device); tensor_kwargs: builds extra keyword tensors from (B, device).
    """

    name: str
    fastpref: str
    fastpref_kwargs: dict
    eager: dict
    compile_base: str
    uses_ref: bool = True
    extra: Callable | None = None
    tensor_kwargs: Callable | None = None
    description: str = ""
    tags: tuple = field(default_factory=tuple)


def _timesteps(B, device):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 1000, (B,), generator=g).to(device),)


def _labels(B, device):
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, 2, (2 * B,), generator=g).to(device),)


def _embeddings(B, device):
    g = torch.Generator().manual_seed(3)
    return {"emb_w": torch.randn(B, 768, generator=g).to(device)}


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("dpo_sigmoid", "diffusion_dpo_loss", {"beta": 5000.0, "loss_type": "sigmoid"},
           {"eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "sigmoid"}),
            "eager-official": (rb.official_dpo, {"beta_dpo": 5000.0})},
           compile_base="eager-diffusers", description="Diffusion-DPO, sigmoid (spec 2.1)",
           tags=("default",)),
    Method("dpo_hinge", "diffusion_dpo_loss", {"beta": 5000.0, "loss_type": "hinge"},
           {"eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "hinge"})},
           compile_base="eager-diffusers", description="Diffusion-DPO, hinge (spec 2.1)"),
    Method("dpo_ipo", "diffusion_dpo_loss", {"beta": 5000.0, "loss_type": "ipo"},
           {"eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "ipo"})},
           compile_base="eager-diffusers", description="Diffusion-DPO, ipo (spec 2.1)"),
    Method("sft", "sft_loss", {},
           {"eager-official": (rb.official_sft, {})},
           compile_base="eager-official", uses_ref=False, description="SFT baseline (spec 2.2)"),
    Method("dspo_sd15", "dspo_loss", {"beta": 0.001, "variant": "sd15"},
           {"eager-official": (rb.official_dspo, {"beta_dpo": 0.001, "sdxl": False})},
           compile_base="eager-official", description="DSPO, SD1.5 variant (spec 2.3)",
           tags=("default",)),
    Method("dspo_sdxl", "dspo_loss", {"beta": 5000.0, "variant": "sdxl"},
           {"eager-official": (rb.official_dspo, {"beta_dpo": 5000.0, "sdxl": True})},
           compile_base="eager-official",
           description="DSPO, SDXL variant (spec 2.3); upstream branches on the host"),
    Method("rpo", "rpo_loss", {"beta": 5000.0, "tau": 0.5},
           {"eager-spec": (rb.spec_rpo, {"beta": 5000.0, "tau": 0.5})},
           compile_base="eager-spec", tensor_kwargs=_embeddings,
           description="Diffusion-RPO with embedding weights (spec 2.4)"),
    Method("rpo_diagonal", "rpo_diagonal_loss", {"beta": 5000.0, "diagonal_weight": 0.8},
           {"eager-spec": (rb.spec_rpo_diagonal, {"beta": 5000.0, "diagonal_weight": 0.8})},
           compile_base="eager-spec", description="Diffusion-RPO diagonal (spec 2.4); B >= 2"),
    Method("sspo", "sspo_loss", {"beta": 5000.0, "criterion": "indicator"},
           {"eager-spec": (rb.spec_sspo, {"beta": 5000.0, "criterion": "indicator"})},
           compile_base="eager-spec", description="SSPO (spec 2.5)"),
    Method("dense_dpo", "dense_dpo_loss", {"beta": 5000.0, "gamma": 0.9},
           {"eager-spec": (rb.spec_dense_dpo, {"beta": 5000.0, "gamma": 0.9})},
           compile_base="eager-spec", extra=_timesteps,
           description="Dense-reward discounted DPO (spec 2.6), [B] timesteps"),
    Method("kto", "kto_loss", {"beta": 1000.0},
           {"eager-spec": (rb.spec_kto, {"beta": 1000.0})},
           compile_base="eager-spec", extra=_labels,
           description="Diffusion-KTO (spec 2.7), 2B unpaired rows"),
    Method("mapo", "mapo_loss", {"beta": 0.1, "snr_value": 0.5},
           {"eager-spec": (rb.spec_mapo, {"beta": 0.1, "snr_value": 0.5})},
           compile_base="eager-spec", uses_ref=False, description="MaPO (spec 2.8)"),
    Method("sdpo", "sdpo_loss", {"beta": 5000.0, "mu": 0.9, "base": "dpo"},
           {"eager-spec": (rb.spec_sdpo, {"beta": 5000.0, "mu": 0.9})},
           compile_base="eager-spec", description="Diffusion-SDPO, DPO base (spec 2.9)"),
    Method("dmpo", "dmpo_loss", {"beta": 2000.0, "alpha": 0.01},
           {"eager-spec": (rb.spec_dmpo, {"beta": 2000.0, "alpha": 0.01})},
           compile_base="eager-spec", description="DMPO (spec 2.10)"),
]}

DEFAULT_METHODS = [m.name for m in METHODS.values() if "default" in m.tags]


def select_methods(spec: str | None) -> list[Method]:
    """Parse a comma list of method names (``all`` for every method, ``None`` for defaults)."""
    if spec is None:
        return [METHODS[n] for n in DEFAULT_METHODS]
    if spec == "all":
        return list(METHODS.values())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    return [METHODS[n] for n in names]
