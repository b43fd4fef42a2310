"""The table of benchmarked loss methods: one ``Method`` entry per benchmarked preset.

Built from fastpref's method descriptors (kernels/method.py): every method is benchmarked
(its presets listed in ``COMPARED``, or its first preset), and every preset of every method
can be named with ``--methods``. ``COMPARED`` adds what only the benchmarks know: the eager
blocks a preset is compared with (provider name -> block and its keyword arguments, with β
translated to each trainer's convention), which eager block the ``compile`` providers compile,
and the benchmarked keyword arguments. Methods that the installed fastpref lacks are skipped
with a printed note by the drivers (``providers.fastpref_fn`` returns ``None`` for them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import reference_blocks as rb
import torch

from fastpref.kernels import PRESETS, REGISTRY
from fastpref.kernels.method import INPUT, POSITIONAL_INPUTS


@dataclass(frozen=True)
class Method:
    """One benchmarked loss method.

    name: the CSV ``kernel_name``; fastpref: attribute name in the ``fastpref`` package;
    fastpref_kwargs: its keyword arguments; eager: provider -> (block, kwargs);
    compile_base: the eager provider whose block the compile providers compile (None: none);
    uses_ref: whether ``ref_pred`` is an input; extra: builds extra positional tensors from
    (B, device); tensor_kwargs: builds extra keyword tensors from (B, device).
    """

    name: str
    fastpref: str
    fastpref_kwargs: dict
    eager: dict
    compile_base: str | None  # None: no eager block, so no compile provider
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


# What each benchmarked preset is compared with: name -> (fastpref keyword arguments, eager blocks
# {provider: (block, kwargs)} with β in each trainer's convention, compile base, tags). A method
# without an entry here is still benchmarked (its first preset, fastpref only, keyword inputs
# built by name) and its presets can be named with --methods.
COMPARED = {
    "dpo_sigmoid": (
        {"beta": 5000.0, "loss_type": "sigmoid"},
        {
            "eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "sigmoid"}),
            "eager-official": (rb.official_dpo, {"beta_dpo": 5000.0}),
            "eager-flow-grpo": (rb.flow_grpo_dpo, {"beta": 5000.0}),
            "eager-simpletuner": (rb.simpletuner_flow_dpo, {"fastpref_beta": 5000.0}),
        },
        "eager-diffusers",
        ("default",),
    ),
    "dpo_hinge": (
        {"beta": 5000.0, "loss_type": "hinge"},
        {"eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "hinge"})},
        "eager-diffusers",
        (),
    ),
    "dpo_ipo": (
        {"beta": 5000.0, "loss_type": "ipo"},
        {"eager-diffusers": (rb.diffusers_dpo, {"beta_dpo": 2500.0, "loss_type": "ipo"})},
        "eager-diffusers",
        (),
    ),
    "sft": ({}, {"eager-official": (rb.official_sft, {})}, "eager-official", ()),
    "dspo_sd15": (
        {"beta": 0.001, "variant": "sd15"},
        {"eager-official": (rb.official_dspo, {"beta_dpo": 0.001, "sdxl": False})},
        "eager-official",
        ("default",),
    ),
    "dspo_sdxl": (
        {"beta": 5000.0, "variant": "sdxl"},
        {"eager-official": (rb.official_dspo, {"beta_dpo": 5000.0, "sdxl": True})},
        "eager-official",
        (),
    ),
    "rpo": (
        {"beta": 5000.0, "tau": 0.5},
        {"eager-spec": (rb.spec_rpo, {"beta": 5000.0, "tau": 0.5})},
        "eager-spec",
        (),
    ),
    "rpo_diagonal": (
        {"beta": 5000.0, "diagonal_weight": 0.8},
        {"eager-spec": (rb.spec_rpo_diagonal, {"beta": 5000.0, "diagonal_weight": 0.8})},
        "eager-spec",
        (),
    ),
    "sspo": (
        {"beta": 5000.0, "criterion": "indicator"},
        {"eager-spec": (rb.spec_sspo, {"beta": 5000.0, "criterion": "indicator"})},
        "eager-spec",
        (),
    ),
    "dense_dpo": (
        {"beta": 5000.0, "gamma": 0.9},
        {"eager-spec": (rb.spec_dense_dpo, {"beta": 5000.0, "gamma": 0.9})},
        "eager-spec",
        (),
    ),
    "kto": ({"beta": 1000.0}, {"eager-spec": (rb.spec_kto, {"beta": 1000.0})}, "eager-spec", ()),
    "mapo": (
        {"beta": 0.1, "snr_value": 0.5},
        {"eager-spec": (rb.spec_mapo, {"beta": 0.1, "snr_value": 0.5})},
        "eager-spec",
        (),
    ),
    "sdpo": (
        {"beta": 5000.0, "mu": 0.9, "base": "dpo"},
        {"eager-spec": (rb.spec_sdpo, {"beta": 5000.0, "mu": 0.9})},
        "eager-spec",
        (),
    ),
    "dmpo": (
        {"beta": 2000.0, "alpha": 0.01},
        {"eager-spec": (rb.spec_dmpo, {"beta": 2000.0, "alpha": 0.01})},
        "eager-spec",
        (),
    ),
}

# Extra inputs by name: a builder (B, device) -> tensor. Positional inputs (timesteps, labels)
# are passed after target; keyword ones where a preset asks for them (an INPUT marker).
INPUTS = {
    "timesteps": lambda B, device: _timesteps(B, device)[0],
    "labels": lambda B, device: _labels(B, device)[0],
    "emb_w": lambda B, device: _embeddings(B, device)["emb_w"],
}


def _method(name, descriptor, preset_kwargs):
    default = ({k: v for k, v in preset_kwargs.items() if v != INPUT}, {}, None, ())
    kwargs, eager, compile_base, tags = COMPARED.get(name, default)
    positional = [n for n in POSITIONAL_INPUTS if n in descriptor.inputs]
    keyword = [n for n, v in preset_kwargs.items() if v == INPUT]
    extra = (lambda B, device: tuple(INPUTS[n](B, device) for n in positional)) if positional else None
    tensor_kwargs = (lambda B, device: {n: INPUTS[n](B, device) for n in keyword}) if keyword else None
    description = f"{descriptor.description} (docs/methods.md §{descriptor.section})" + (
        f", {name}" if name != descriptor.name else ""
    )
    return Method(
        name,
        descriptor.function,
        kwargs,
        eager,
        compile_base,
        uses_ref=descriptor.needs_ref,
        extra=extra,
        tensor_kwargs=tensor_kwargs,
        description=description,
        tags=tags,
    )


def _benchmarked(descriptor):
    """The presets of `descriptor` that are benchmarked by default: those in COMPARED, or its first."""
    names = [p for p, _ in descriptor.presets if p in COMPARED]
    return names or [descriptor.presets[0][0]]


ALL_PRESETS: dict[str, Method] = {name: _method(name, d, kw) for name, (d, kw) in PRESETS.items()}
"""Every preset of every method descriptor, benchmarkable by name (``--methods``)."""

METHODS: dict[str, Method] = {name: ALL_PRESETS[name] for d in REGISTRY.values() for name in _benchmarked(d)}
"""The benchmarked methods (``--methods all``), in the order of docs/methods.md."""

DEFAULT_METHODS = [m.name for m in METHODS.values() if "default" in m.tags]


def select_methods(spec: str | None) -> list[Method]:
    """Parse a comma list of method names (``all`` for every method, ``None`` for defaults)."""
    if spec is None:
        return [METHODS[n] for n in DEFAULT_METHODS]
    if spec == "all":
        return list(METHODS.values())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    names = [n.replace("-", "_") for n in names]  # dpo-hinge is dpo_hinge
    unknown = [n for n in names if n not in ALL_PRESETS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {sorted(ALL_PRESETS)}")
    return [ALL_PRESETS[n] for n in names]
