"""`PreferenceLoss`: the losses as an nn.Module, hyperparameters checked once in __init__."""

import inspect

import torch

from fastpref import _validate, losses
from fastpref.kernels import REGISTRY

METHODS = dict(losses.FUNCTIONS)
"""Method name (the registry's, kernels/registry.py) -> its public loss function."""

ALIASES = {
    alias: name
    for name, method in REGISTRY.items()
    for alias in method.aliases + (name.replace("_", "-"),)
    if alias != name
}
"""Other accepted spellings of a method name: each descriptor's aliases, and dashes for underscores."""


class PreferenceLoss(torch.nn.Module):
    """PreferenceLoss(method="dpo", **hyperparameters)(model_pred, ref_pred, target, **inputs)
    -> (loss, metrics). `method` is a key of METHODS (or of ALIASES); hyperparameters are that loss's keyword
    arguments (beta, loss_type, ...); `inputs` its per-batch tensors (timesteps, labels,
    emb_w/emb_l). ref_pred is None for reference-free methods (sft, mapo)."""

    def __init__(self, method="dpo", **hyperparameters):
        super().__init__()
        method = ALIASES.get(method, method) if isinstance(method, str) else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        fn = METHODS[method]
        params = inspect.signature(fn).parameters
        allowed = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown = sorted(set(hyperparameters) - set(allowed))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for method {method!r}; expected some of {allowed}")
        self.method = method
        self.hyperparameters = dict(hyperparameters)
        self._fn = fn
        self._uses_ref = "ref_pred" in params
        _check_hyperparameters(method, self.hyperparameters)

    def forward(self, model_pred, ref_pred=None, target=None, *args, **inputs):
        if target is None:
            raise ValueError("target is required")
        if self._uses_ref:
            if ref_pred is None:
                raise ValueError(f"ref_pred is required for method {self.method!r}")
            return self._fn(model_pred, ref_pred, target, *args, **inputs, **self.hyperparameters)
        if ref_pred is not None:
            raise ValueError(f"method {self.method!r} takes no ref_pred; pass ref_pred=None")
        return self._fn(model_pred, target, *args, **inputs, **self.hyperparameters)

    def extra_repr(self):
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.hyperparameters.items()])


def _check_hyperparameters(method, hyperparameters):
    """Validate hyperparameter values now, with the loss's own checks (each loss checks its
    hyperparameters before its tensors, and stops at the stand-in model_pred)."""
    fn = METHODS[method]
    stand_in = _validate.HyperparametersOnly
    n_tensors = sum(
        1 for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    try:
        fn(stand_in, *([None] * (n_tensors - 1)), **hyperparameters)
    except _validate.HyperparametersChecked:
        return
    raise AssertionError(f"{method}: hyperparameter validation did not reach the tensor checks")
