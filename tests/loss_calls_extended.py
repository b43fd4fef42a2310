"""One representative call per extended method and variant (spec §2.4-2.10), for the checks
every method must pass (no host sync, memory), in the format of `loss_calls.py`.

name -> (function, uses ref_pred, keyword arguments). A keyword value that is a callable is a
factory `value(model_pred)` for a tensor argument (timesteps, labels, embeddings): resolve
them with `resolve` before any measured window, so that building them is not counted."""
import torch

import fastpref


def _timesteps(model_pred):
    """[B] timesteps (the CUDA-graph-capturable form; the [2B] form's halves check reads values)."""
    B = model_pred.shape[0] // 2
    return torch.arange(B, device=model_pred.device) * 997 % 1000


def _labels(model_pred):
    return torch.arange(model_pred.shape[0], device=model_pred.device) % 2


def _embeddings(seed):
    def make(model_pred):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(model_pred.shape[0] // 2, 16, generator=g).to(model_pred.device)
    return make


CALLS_EXTENDED = {
    "rpo-ones": (fastpref.rpo_loss, True, dict(beta=5000.0)),
    "rpo-emb": (fastpref.rpo_loss, True, dict(beta=5000.0, emb_w=_embeddings(0), emb_l=_embeddings(1))),
    "rpo-diagonal": (fastpref.rpo_diagonal_loss, True, dict(beta=5000.0)),
    "sspo-indicator": (fastpref.sspo_loss, True, dict(beta=5000.0)),
    "sspo-sign": (fastpref.sspo_loss, True, dict(beta=5000.0, criterion="sign")),
    "dense": (fastpref.dense_dpo_loss, True, dict(timesteps=_timesteps, beta=5000.0)),
    "kto": (fastpref.kto_loss, True, dict(labels=_labels, beta=1000.0)),
    "kto-baseline": (fastpref.kto_loss, True, dict(labels=_labels, beta=1000.0, kl_baseline=1e-3)),
    "mapo": (fastpref.mapo_loss, False, dict()),
    "sdpo-dpo": (fastpref.sdpo_loss, True, dict(beta=5000.0)),
    "sdpo-dspo-sd15": (fastpref.sdpo_loss, True, dict(beta=0.001, mu=0.2, base="dspo")),
    "sdpo-dspo-sdxl": (fastpref.sdpo_loss, True, dict(beta=5000.0, mu=0.6, base="dspo", dspo_variant="sdxl")),
    "sdpo-dmpo": (fastpref.sdpo_loss, True, dict(beta=2000.0, base="dmpo")),
    "sdpo-off": (fastpref.sdpo_loss, True, dict(beta=5000.0, safeguard=False)),
    "dmpo": (fastpref.dmpo_loss, True, dict(beta=2000.0)),
}


def resolve(name, model_pred):
    """(function, uses ref_pred, keyword arguments with tensor factories applied)."""
    fn, uses_ref, kw = CALLS_EXTENDED[name]
    return fn, uses_ref, {k: (v(model_pred) if callable(v) else v) for k, v in kw.items()}


def call(name, model_pred, ref_pred, target, resolved=None):
    fn, uses_ref, kw = resolved or resolve(name, model_pred)
    return fn(model_pred, ref_pred, target, **kw) if uses_ref else fn(model_pred, target, **kw)
