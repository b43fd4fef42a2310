"""``--loss_type`` dispatch: one table entry per training objective, on top of fastpref's losses.

The table is built from the method descriptors (kernels/method.py: each one's ``loss_types``),
so adding a method adds no line here; β defaults to the fastpref function's own default.
Rows ``0..B-1`` of every batch are winners, ``B..2B-1`` losers.
"""

import inspect
from dataclasses import dataclass, field

import torch

import fastpref
from fastpref.kernels import REGISTRY
from fastpref.kernels.method import INPUT, POSITIONAL_INPUTS


@dataclass(frozen=True)
class LossType:
    """How one ``--loss_type`` turns (model_pred, ref_pred, target) into ``(loss, metrics)``."""

    function: str  # name of the fastpref function
    needs_reference: bool  # whether ref_pred is computed and passed
    options: dict = field(default_factory=dict)  # fixed keyword arguments
    description: str = ""
    data: str = "pairs"  # batch layout: pairs, images (KTO) or winners (SSPO)
    extra_input: str | None = None  # Batch field passed after target: timesteps or labels
    prompt_weights: bool = False  # RPO: W from the pooled prompt embeddings and --rpo_tau
    min_pairs: int = 1  # smallest per-process micro-batch the loss accepts

    @property
    def default_beta(self) -> float | None:
        """The fastpref function's own default β (docs/methods.md's); None if it takes no β."""
        param = inspect.signature(getattr(fastpref, self.function)).parameters.get("beta")
        return None if param is None else param.default

    def __call__(
        self,
        model_pred: torch.Tensor,
        ref_pred: torch.Tensor | None,
        target: torch.Tensor,
        batch,
        *,
        beta: float | None = None,
        rpo_tau: float = 0.5,
        kl_baseline: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
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


def _loss_type(method, preset, description) -> LossType:
    """The table entry of one of `method`'s ``loss_types`` (kernels/method.py)."""
    kwargs = method.preset(preset)
    prompt_weights = kwargs.pop("emb_w", None) == INPUT
    extra = next((name for name in method.inputs if name in POSITIONAL_INPUTS), None)
    return LossType(
        method.function,
        method.needs_ref,
        kwargs,
        description,
        data=method.data,
        extra_input=extra,
        prompt_weights=prompt_weights,
        min_pairs=method.min_pairs,
    )


LOSS_TYPES: dict[str, LossType] = {
    name: _loss_type(method, preset, description)
    for method in REGISTRY.values()
    for name, preset, description in method.loss_types
}
"""``--loss_type`` name -> entry, from every method descriptor's ``loss_types``."""


def get_loss_type(name: str) -> LossType:
    """The table entry of ``--loss_type name``; ValueError naming the choices otherwise."""
    if name not in LOSS_TYPES:
        raise ValueError(f"--loss_type: expected one of {sorted(LOSS_TYPES)}, got {name!r}")
    entry = LOSS_TYPES[name]
    if not callable(getattr(fastpref, entry.function, None)):
        raise ValueError(
            f"--loss_type {name!r} needs fastpref.{entry.function}, which this fastpref installation does not provide"
        )
    return entry
