"""One representative call per method and variant, for the checks every method must pass
(no host sync, memory, graph capture)."""

import torch

import fastpref
from fastpref.kernels import PRESETS
from fastpref.kernels.method import INPUT, POSITIONAL_INPUTS


def _labels(model_pred):
    return (torch.arange(model_pred.shape[0], device=model_pred.device) % 3 != 0).to(torch.int64)


def _timesteps(model_pred):
    B = model_pred.shape[0] // 2
    return torch.arange(B, device=model_pred.device) * 997 % 1000


_EMBEDDINGS = {}


def _emb(model_pred):
    """Fixed prompt embeddings per (B, device), made once: a host-to-device copy must not
    happen inside a CUDA-graph capture."""
    B = model_pred.shape[0] // 2
    key = (B, model_pred.device)
    if key not in _EMBEDDINGS:
        g = torch.Generator().manual_seed(0)
        _EMBEDDINGS[key] = torch.randn(B, 16, generator=g).to(model_pred.device)
    return _EMBEDDINGS[key]


# Hyperparameters the tests use instead of a preset's defaults (betas that keep the tests'
# small random inputs away from saturation); a preset missing here runs with its defaults.
TEST_KWARGS = {
    "dpo_hinge": dict(beta=50.0),
    "dpo_ipo": dict(beta=50.0),
    "dspo_sdxl": dict(beta=5000.0),
    "rpo": dict(beta=500.0),
    "rpo_uniform": dict(beta=500.0),
    "rpo_diagonal": dict(beta=500.0),
    "sdpo_dspo_sd15": dict(beta=0.001, mu=0.2),
    "sdpo_dmpo": dict(beta=2000.0),
}


def _entry(name, method, kwargs):
    kw = {k: v for k, v in kwargs.items() if v != INPUT}
    if "beta" in method.hyper_names:
        kw.setdefault("beta", next(h.default for h in method.hypers if h.name == "beta"))
    kw.update(TEST_KWARGS.get(name, {}))
    extras = tuple(n for n in POSITIONAL_INPUTS if n in method.inputs)
    extras += ("emb",) if kwargs.get("emb_w") == INPUT else ()
    return getattr(fastpref, method.function), method.needs_ref, kw, extras


# name -> (function, uses ref_pred, keyword arguments, extra inputs built from model_pred): every
# preset of every method descriptor (kernels/method.py), so a new method is tested without a line here.
CALLS = {name: _entry(name, method, kwargs) for name, (method, kwargs) in PRESETS.items()}

_EXTRA = {"labels": _labels, "timesteps": _timesteps}


def call(name, model_pred, ref_pred, target):
    fn, uses_ref, kw, extras = CALLS[name]
    kw = dict(kw)
    args = []
    for extra in extras:
        if extra == "emb":
            kw["emb_w"] = _emb(model_pred)
        else:
            args.append(_EXTRA[extra](model_pred))
    if uses_ref:
        return fn(model_pred, ref_pred, target, *args, **kw)
    return fn(model_pred, target, *args, **kw)
