"""One representative call per method and variant, for the checks every method must pass
(no host sync, memory, graph capture)."""
import torch

import fastpref


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


# name -> (function, uses ref_pred, keyword arguments, extra positional inputs built from model_pred)
CALLS = {
    "dpo-sigmoid": (fastpref.diffusion_dpo_loss, True, dict(beta=5000.0), ()),
    "dpo-hinge": (fastpref.diffusion_dpo_loss, True, dict(beta=50.0, loss_type="hinge"), ()),
    "dpo-ipo": (fastpref.diffusion_dpo_loss, True, dict(beta=50.0, loss_type="ipo"), ()),
    "sft": (fastpref.sft_loss, False, dict(), ()),
    "sft-winners": (fastpref.sft_loss, False, dict(winners_only=True), ()),
    "dspo-sd15": (fastpref.dspo_loss, True, dict(beta=0.001), ()),
    "dspo-sdxl": (fastpref.dspo_loss, True, dict(beta=5000.0, variant="sdxl"), ()),
    "rpo": (fastpref.rpo_loss, True, dict(beta=500.0), ()),
    "rpo-emb": (fastpref.rpo_loss, True, dict(beta=500.0), ("emb",)),
    "rpo-diagonal": (fastpref.rpo_diagonal_loss, True, dict(beta=500.0), ()),
    "sspo": (fastpref.sspo_loss, True, dict(beta=5000.0), ()),
    "sspo-sign": (fastpref.sspo_loss, True, dict(beta=5000.0, criterion="sign"), ()),
    "dense-dpo": (fastpref.dense_dpo_loss, True, dict(beta=5000.0), ("timesteps",)),
    "kto": (fastpref.kto_loss, True, dict(beta=1000.0), ("labels",)),
    "kto-baseline": (fastpref.kto_loss, True, dict(beta=1000.0, kl_baseline=1e-3), ("labels",)),
    "mapo": (fastpref.mapo_loss, False, dict(beta=0.1), ()),
    "sdpo-dpo": (fastpref.sdpo_loss, True, dict(beta=5000.0), ()),
    "sdpo-dpo-off": (fastpref.sdpo_loss, True, dict(beta=5000.0, safeguard=False), ()),
    "sdpo-dspo-sd15": (fastpref.sdpo_loss, True, dict(beta=0.001, mu=0.2, base="dspo"), ()),
    "sdpo-dspo-sdxl": (fastpref.sdpo_loss, True, dict(beta=5000.0, base="dspo", dspo_variant="sdxl"), ()),
    "sdpo-dmpo": (fastpref.sdpo_loss, True, dict(beta=2000.0, base="dmpo"), ()),
    "dmpo": (fastpref.dmpo_loss, True, dict(beta=2000.0), ()),
}

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
