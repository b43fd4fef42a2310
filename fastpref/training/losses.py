"""``--loss_type`` dispatch: one table entry per training objective, on top of fastpref's losses.

Adding a method is one entry: the fastpref function it calls and whether it needs a reference
prediction; β defaults to that function's own default. Rows ``0..B-1`` of every batch are
winners, ``B..2B-1`` losers.
"""

import inspect
from dataclasses import dataclass, field

import torch

import fastpref


@dataclass(frozen=True)
class LossType:
    """How one ``--loss_type`` turns (model_pred, ref_pred, target) into ``(loss, metrics)``."""

    function: str                       # name of the fastpref function
    needs_reference: bool               # whether ref_pred is computed and passed
    options: dict = field(default_factory=dict)  # fixed keyword arguments
    description: str = ""
    data: str = "pairs"                 # batch layout: pairs, images (KTO) or winners (SSPO)
    extra_input: str | None = None      # Batch field passed after target: timesteps or labels
    prompt_weights: bool = False        # RPO: W from the pooled prompt embeddings and --rpo_tau
    min_pairs: int = 1                  # smallest per-process micro-batch the loss accepts

    @property
    def default_beta(self) -> float | None:
        """The fastpref function's own default β (the spec's); None if it takes no β."""
        param = inspect.signature(getattr(fastpref, self.function)).parameters.get("beta")
        return None if param is None else param.default

    def __call__(self, model_pred: torch.Tensor, ref_pred: torch.Tensor | None, target: torch.Tensor,
                 batch, *, beta: float | None = None, rpo_tau: float = 0.5,
                 kl_baseline: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Evaluate on ``[R, C, H, W]`` predictions of ``batch`` (a ``Batch``; paired layouts put
        winners in rows ``0..B-1``); returns fastpref's ``(loss, metrics)``."""
        fn = getattr(fastpref, self.function)
        kwargs = dict(self.options)
        if beta is not None and self.default_beta is not None:
            kwargs["beta"] = beta
        inputs = (model_pred, ref_pred, target) if self.needs_reference else (model_pred, target)
        half = model_pred.shape[0] // 2
        if self.extra_input == "timesteps":
            inputs += (batch.timesteps[:half],)  # a pair's shared t
        elif self.extra_input == "labels":
            inputs += (batch.labels,)
            if kl_baseline is not None:
                kwargs["kl_baseline"] = kl_baseline
        if self.prompt_weights:
            kwargs.update(emb_w=batch.pooled[:half], tau=rpo_tau)
        return fn(*inputs, **kwargs)


LOSS_TYPES: dict[str, LossType] = {
    "dpo": LossType("diffusion_dpo_loss", True, {"loss_type": "sigmoid"},
                    "Diffusion-DPO, sigmoid (the paper's loss)"),
    "dpo_hinge": LossType("diffusion_dpo_loss", True, {"loss_type": "hinge"},
                          "Diffusion-DPO, hinge"),
    "dpo_ipo": LossType("diffusion_dpo_loss", True, {"loss_type": "ipo"},
                        "Diffusion-DPO, IPO"),
    "sft": LossType("sft_loss", False, {"winners_only": True},
                    "supervised fine-tuning on the winners (no reference)"),
    "dspo": LossType("dspo_loss", True, {"variant": "sd15"}, "DSPO, SD1.5 variant"),
    "dspo_sdxl": LossType("dspo_loss", True, {"variant": "sdxl"},
                          "DSPO, SDXL variant (the official SDXL launcher passes --beta 5000)"),
    "dense_dpo": LossType("dense_dpo_loss", True, {}, "Diffusion-DPO with the dense-reward "
                          "temporal discount (gamma 0.9, 50 sampler steps)", extra_input="timesteps"),
    "rpo": LossType("rpo_loss", True, {}, "Diffusion-RPO, all winner x loser pairs weighted by the "
                    "similarity of their pooled prompt embeddings (--rpo_tau)", prompt_weights=True),
    "rpo_uniform": LossType("rpo_loss", True, {}, "Diffusion-RPO, all winner x loser pairs, uniform weights"),
    "rpo_diagonal": LossType("rpo_diagonal_loss", True, {}, "Diffusion-RPO, diagonal weight 0.8",
                             min_pairs=2),
    "kto": LossType("kto_loss", True, {}, "Diffusion-KTO: every image a labelled row (unpaired)",
                    data="images", extra_input="labels"),
    "mapo": LossType("mapo_loss", False, {}, "MaPO (reference-free: no reference forward)"),
    "sdpo": LossType("sdpo_loss", True, {}, "Diffusion-SDPO: DPO with the safeguarded loser gradient"),
    "dmpo": LossType("dmpo_loss", True, {}, "DMPO"),
    "sspo": LossType("sspo_loss", True, {}, "SSPO: winners vs self-samples of a replayed checkpoint, "
                     "which is also the reference", data="winners"),
}


def get_loss_type(name: str) -> LossType:
    """The table entry of ``--loss_type name``; ValueError naming the choices otherwise."""
    if name not in LOSS_TYPES:
        raise ValueError(f"--loss_type: expected one of {sorted(LOSS_TYPES)}, got {name!r}")
    entry = LOSS_TYPES[name]
    if not callable(getattr(fastpref, entry.function, None)):
        raise ValueError(f"--loss_type {name!r} needs fastpref.{entry.function}, which this "
                         f"fastpref installation does not provide")
    return entry
