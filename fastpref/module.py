"""`PreferenceLoss`: the losses as an nn.Module, hyperparameters checked once in __init__."""
import inspect

import torch

from fastpref import losses

METHODS = {
    "dpo": losses.diffusion_dpo_loss,
    "sft": losses.sft_loss,
    "dspo": losses.dspo_loss,
}


class PreferenceLoss(torch.nn.Module):
    """PreferenceLoss(method="dpo", **hyperparameters)(model_pred, ref_pred, target, **inputs)
    -> (loss, metrics). `method` is one of METHODS; hyperparameters are the keyword arguments
    of that loss function (e.g. beta, loss_type). ref_pred is None for reference-free methods."""

    def __init__(self, method="dpo", **hyperparameters):
        super().__init__()
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
        _check_hyperparameters(fn, self.hyperparameters)

    def forward(self, model_pred, ref_pred=None, target=None, **inputs):
        if target is None:
            raise ValueError("target is required")
        if self._uses_ref:
            if ref_pred is None:
                raise ValueError(f"ref_pred is required for method {self.method!r}")
            return self._fn(model_pred, ref_pred, target, **inputs, **self.hyperparameters)
        if ref_pred is not None:
            raise ValueError(f"method {self.method!r} takes no ref_pred; pass ref_pred=None")
        return self._fn(model_pred, target, **inputs, **self.hyperparameters)

    def extra_repr(self):
        return ", ".join([repr(self.method)] + [f"{k}={v!r}" for k, v in self.hyperparameters.items()])


def _check_hyperparameters(fn, hyperparameters):
    """Validate hyperparameter values now, with the loss's own checks, on a tiny CPU batch
    shape: the checks read only metadata, so nothing runs on the device."""
    from fastpref import _validate as v
    for name, value in hyperparameters.items():
        if name in ("beta",):
            v.check_positive_finite(name, value)
        elif name == "sdxl_threshold":
            v.check_finite(name, value)
        elif name == "loss_type":
            v.check_choice(name, value, losses.dpo.LOSS_TYPES)
        elif name == "variant":
            v.check_choice(name, value, losses.dspo.VARIANTS)
