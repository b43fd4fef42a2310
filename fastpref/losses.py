"""The public losses. Each validates its inputs (before any launch), runs the fused
Function and returns `(loss, metrics)`: a 0-dim tensor in the compute dtype (float32, or
float64 for float64 inputs) and a dict of detached tensors with docs/methods.md's keys.

Layout: model_pred, ref_pred, target are [2B, ...] (rank >= 2, any trailing dims), winners in
rows 0..B-1, their losers in rows B..2B-1 (`kto_loss` and `sft_loss`: any [N, ...]); dtypes
float16/bfloat16/float32/float64, mixed freely. The gradient flows into model_pred only, in
model_pred's dtype. No function reads a tensor value back to the host (CUDA-graph safe), except
the eager-only timestep-halves check of `dense_dpo_loss` (skipped during graph capture).

ref_pred and target are constants: one that requires grad is refused with a ValueError naming
it (pass `.detach()`), before any launch.

Non-finite inputs, one rule for every loss: a NaN, +inf or -inf anywhere in model_pred,
ref_pred or target gives a NaN loss; NaN at that pair's entries of the per-pair metric vectors
(inside_term, criterion), the other pairs' entries unchanged; and NaN for every batch metric
that pair enters, accuracies included (KTO and SFT: per row). Metrics that do not depend on
the predictions (RPO weights, dense-DPO step weights, a given KTO baseline, λ = 1 without
SDPO's safeguard) are unchanged; integer branch metrics stay integers (a NaN q takes DSPO-SDXL
branch 2); rows a loss does not read (the losers of `sft_loss(winners_only=True)`) do not
count. The gradient of that pair's rows may be NaN or inf, and every row's where one batch
quantity couples the pairs (RPO, KTO's own baseline, SDPO's safeguard λ).
"""

import inspect
import sys

import torch

from fastpref import _validate as v
from fastpref import functions as fn
from fastpref import ops
from fastpref.kernels import REGISTRY
from fastpref.kernels.method import POSITIONAL_INPUTS

DPO, SFT, DSPO, RPO, RPO_DIAGONAL, SSPO, DENSE_DPO, KTO, MAPO, SDPO, DMPO = (
    REGISTRY[name]
    for name in ("dpo", "sft", "dspo", "rpo", "rpo_diagonal", "sspo", "dense_dpo", "kto", "mapo", "sdpo", "dmpo")
)


def _paired(model_pred, ref_pred, target):
    v.check_predictions(True, model_pred, target, ref_pred)
    return model_pred.shape[0] // 2


def diffusion_dpo_loss(model_pred, ref_pred, target, *, beta=5000.0, loss_type="sigmoid"):
    """Diffusion-DPO (docs/methods.md §2.1), β in the official convention (diffusers SD1.5 `beta_dpo` x 2).

    loss_type: "sigmoid" (mean softplus(-inside)), "hinge" or "ipo". Metrics: loss,
    implicit_acc, implicit_acc_ties_half, model_mse, ref_mse, model_mse_w, model_mse_l,
    ref_mse_w, ref_mse_l, inside_term ([B])."""
    floats = v.check_hyperparameters(DPO, locals(), {"loss_type": loss_type})
    _paired(model_pred, ref_pred, target)
    return fn.call(model_pred, ref_pred, target, DPO, floats, {"loss_type": loss_type})


def sft_loss(model_pred, target, *, winners_only=False):
    """SFT baseline (docs/methods.md §2.2): mean squared error over every element of the kept rows.

    model_pred, target: [N, ...]; winners_only=True keeps rows 0..N/2-1 of a paired batch (the
    losers get zero gradient). Metrics: loss."""
    v.check_predictions(bool(winners_only), model_pred, target)
    keep = model_pred.shape[0] // 2 if winners_only else model_pred.shape[0]
    return fn.call(model_pred, None, target, SFT, count=keep)


def dspo_loss(model_pred, ref_pred, target, *, beta=0.001, variant="sd15", sdxl_threshold=0.1):
    """DSPO (docs/methods.md §2.3). variant "sd15" or "sdxl"; the sdxl branch (q >= sdxl_threshold: 1,
    else 2) is chosen on the device. Metrics: loss, implicit_acc, model_mse, ref_mse,
    weight_mean, sdxl_branch (0-dim int64: 0 for sd15)."""
    floats = v.check_hyperparameters(DSPO, locals(), {"variant": variant})
    _paired(model_pred, ref_pred, target)
    return fn.call(model_pred, ref_pred, target, DSPO, floats, {"variant": variant})


def rpo_loss(model_pred, ref_pred, target, *, emb_w=None, emb_l=None, beta=5000.0, tau=0.5):
    """Diffusion-RPO (docs/methods.md §2.4): every winner against every loser, B x B logits weighted by
    W = softmax_j(cos(emb_w[i], emb_l[j]) / tau) (emb_w, emb_l: [B, D] prompt embeddings,
    constant; emb_l defaults to emb_w), or W = 1 without embeddings. Metrics: loss,
    implicit_acc, pair_acc_all, weights ([B, B]), diag_weight_mean, model_mse, ref_mse."""
    floats = v.check_hyperparameters(RPO, {"beta": beta, "tau": tau})
    B = _paired(model_pred, ref_pred, target)
    if emb_w is None and emb_l is not None:
        raise ValueError("emb_l was given without emb_w: pass emb_w (and optionally emb_l), or neither")
    if emb_w is not None:
        emb_l = emb_w if emb_l is None else emb_l
        for name, emb in (("emb_w", emb_w), ("emb_l", emb_l)):
            v.check_aux_tensor(
                name, emb, model_pred.device, f"[B={B}, D]", lambda s: len(s) == 2 and s[0] == B and s[1] > 0
            )
            v.check_float_tensor(name, emb)
        if emb_l.shape != emb_w.shape:
            raise ValueError(f"emb_l must have the shape of emb_w {tuple(emb_w.shape)}, got {tuple(emb_l.shape)}")
        emb_w, emb_l = emb_w.detach(), emb_l.detach()
    return fn.call(
        model_pred,
        ref_pred,
        target,
        RPO,
        floats,
        {"has_emb": emb_w is not None},
        {"emb_w": emb_w, "emb_l": emb_l},
    )


def rpo_diagonal_loss(model_pred, ref_pred, target, *, beta=5000.0, diagonal_weight=0.8):
    """Diffusion-RPO with a diagonal weight (docs/methods.md §2.4): w_d on each pair's own term, 1 - w_d on
    the mean of its B - 1 cross-pair terms. Needs B >= 2. Metrics: loss, implicit_acc."""
    floats = v.check_hyperparameters(RPO_DIAGONAL, locals())
    B = _paired(model_pred, ref_pred, target)
    if B < 2:
        raise ValueError(f"rpo_diagonal_loss needs B >= 2 pairs, got model_pred of shape {tuple(model_pred.shape)}")
    return fn.call(model_pred, ref_pred, target, RPO_DIAGONAL, floats)


def sspo_loss(model_pred, ref_pred, target, *, beta=5000.0, criterion="indicator"):
    """SSPO / SePPO (docs/methods.md §2.5): rows 0..B-1 dataset winners, rows B..2B-1 self-samples of a
    replayed checkpoint, which also gives ref_pred. criterion "indicator" (SSPO) or "sign"
    (SePPO v1). Metrics: loss, dpo_fraction, criterion ([B]), implicit_acc, model_mse_w, ref_mse_w."""
    floats = v.check_hyperparameters(SSPO, locals(), {"criterion": criterion})
    _paired(model_pred, ref_pred, target)
    return fn.call(model_pred, ref_pred, target, SSPO, floats, {"criterion": criterion})


def dense_dpo_loss(
    model_pred,
    ref_pred,
    target,
    timesteps,
    *,
    beta=5000.0,
    gamma=0.9,
    num_inference_steps=50,
    num_train_timesteps=1000,
    normalize=True,
):
    """Diffusion-DPO with the dense-reward temporal discount (docs/methods.md §2.6): pair i's β is scaled by
    w(t_i) = γ^k(t_i) (normalised to mean 1 over the K sampler steps when normalize=True).
    timesteps: 1-D, length B or 2B (then the halves must match; checked eagerly, skipped during
    CUDA-graph capture and when traced), integer or floating. Metrics: loss, implicit_acc, step_weight_mean,
    model_mse, ref_mse."""
    floats = v.check_hyperparameters(
        DENSE_DPO,
        {
            "beta": beta,
            "gamma": gamma,
            "num_inference_steps": num_inference_steps,
            "num_train_timesteps": num_train_timesteps,
            "normalize": normalize,
        },
    )
    B = _paired(model_pred, ref_pred, target)
    v.check_aux_tensor(
        "timesteps",
        timesteps,
        model_pred.device,
        f"[B={B}] or [2B={2 * B}]",
        lambda s: len(s) == 1 and s[0] in (B, 2 * B),
    )
    if timesteps.dtype == torch.bool:
        raise TypeError("timesteps must be integer or floating, got torch.bool")
    if timesteps.shape[0] == 2 * B and not _capturing(timesteps) and not ops.traced(timesteps):
        if not torch.equal(timesteps[:B], timesteps[B:]):  # host-ok: documented eager-only check (docs/methods.md §2.6)
            raise ValueError(
                "timesteps of length 2B must repeat the winners' timesteps for the losers "
                "(a pair shares t); the halves differ"
            )
    K = num_inference_steps
    scale = K / sum(gamma**j for j in range(K)) if normalize else 1.0
    floats["weight_scale"] = float(scale)
    return fn.call(model_pred, ref_pred, target, DENSE_DPO, floats, inputs={"timesteps": timesteps.detach()})


def kto_loss(model_pred, ref_pred, target, labels, *, beta=1000.0, lambda_d=1.0, lambda_u=1.0, kl_baseline=None):
    """Diffusion-KTO (docs/methods.md §2.7) on unpaired rows [N, ...]; labels: 1-D of length N, any real
    dtype, nonzero = desirable. kl_baseline: None (z = max(0, mean_k (r_k - m_k)), detached), a
    float, or a 0-dim tensor used as given. Metrics: loss, kl, acc, model_mse."""
    floats = v.check_hyperparameters(
        KTO, {"beta": beta, "lambda_d": lambda_d, "lambda_u": lambda_u, "kl_baseline": kl_baseline}
    )
    if kl_baseline is not None and not isinstance(kl_baseline, torch.Tensor):
        v.check_finite("kl_baseline", kl_baseline)
    v.check_predictions(False, model_pred, target, ref_pred)
    N = model_pred.shape[0]
    v.check_aux_tensor("labels", labels, model_pred.device, f"[N={N}]", lambda s: s == (N,))
    if labels.dtype == torch.bool:
        labels = labels.view(torch.uint8)
    kl_mode, kl_value, kl_tensor = 0, 0.0, None
    if isinstance(kl_baseline, torch.Tensor):
        v.check_aux_tensor("kl_baseline", kl_baseline, model_pred.device, "[] (0-dim)", lambda s: s == ())
        v.check_float_tensor("kl_baseline", kl_baseline)
        kl_mode, kl_tensor = 2, kl_baseline.detach()
    elif kl_baseline is not None:
        v.check_finite("kl_baseline", kl_baseline)
        kl_mode, kl_value = 1, float(kl_baseline)
    floats["kl_value"] = kl_value
    return fn.call(
        model_pred,
        ref_pred,
        target,
        KTO,
        floats,
        {"kl_mode": ("batch", "value", "tensor")[kl_mode]},
        {"labels": labels.detach(), "kl_tensor": kl_tensor},
    )


def mapo_loss(model_pred, target, *, beta=0.1, snr_value=0.5, num_train_timesteps=1000):
    """MaPO (docs/methods.md §2.8), reference-free, paired [2B, ...]. Metrics: loss, win_score, lose_score,
    or_loss, model_mse_w, model_mse_l, margin_acc."""
    floats = v.check_hyperparameters(MAPO, locals())
    v.check_predictions(True, model_pred, target)
    return fn.call(model_pred, None, target, MAPO, floats)


def sdpo_loss(
    model_pred,
    ref_pred,
    target,
    *,
    beta=5000.0,
    mu=0.9,
    base="dpo",
    safeguard=True,
    eps=1e-9,
    max_scale=1.0,
    dspo_variant="sd15",
    sdxl_threshold=0.1,
    dmpo_alpha=0.01,
):
    """Diffusion-SDPO (docs/methods.md §2.9): the base loss ("dpo", "dspo" or "dmpo") with every loser-row
    gradient scaled by the safeguard λ (a constant per call; 1 with safeguard=False). Metrics:
    loss, implicit_acc, model_mse, ref_mse, win_diff, lose_diff, loser_grad_scale, inside_term
    ([B]); with the safeguard also safeguard_num, safeguard_den, safeguard_proxy_grad_cos; with
    base "dspo" also dspo_branch."""
    floats = v.check_hyperparameters(SDPO, locals(), {"base": base})
    if base == "dspo":
        v.check_hyperparameters(SDPO, locals(), {"dspo_variant": dspo_variant})
    options = {"base": base, "dspo_variant": dspo_variant if base == "dspo" else "sd15", "safeguard": bool(safeguard)}
    _paired(model_pred, ref_pred, target)
    drop = () if safeguard else ("safeguard_num", "safeguard_den", "safeguard_proxy_grad_cos")
    if base != "dspo":
        drop += ("dspo_branch",)
    return fn.call(model_pred, ref_pred, target, SDPO, floats, options, drop=drop)


def dmpo_loss(model_pred, ref_pred, target, *, beta=2000.0, alpha=0.01):
    """DMPO (docs/methods.md §2.10): KL(Bernoulli(σ(inside)) || Bernoulli(1 - α)), α clamped into
    [1e-6, 1 - 1e-6] as 1 - q. Metrics: loss, implicit_acc, model_mse, ref_mse."""
    floats = v.check_hyperparameters(DMPO, locals())
    _paired(model_pred, ref_pred, target)
    return fn.call(model_pred, ref_pred, target, DMPO, floats)


def _capturing(x):
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def generic_loss(method):
    """The public function of a method that has no explicit one above (a new head file only):
    signature (model_pred, [ref_pred,] target, *positional inputs, *, hyperparameters, public
    options, keyword inputs) from its descriptor, hyperparameters and options checked by the
    descriptor, tensors by the shared checks; an extra input is any tensor on model_pred's
    device (detached). Write an explicit function here when the method needs more checks."""
    P = inspect.Parameter
    params = [P("model_pred", P.POSITIONAL_OR_KEYWORD)]
    params += [P("ref_pred", P.POSITIONAL_OR_KEYWORD)] if method.needs_ref else []
    params += [P("target", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD) for n in POSITIONAL_INPUTS if n in method.inputs]
    params += [P(h.name, P.KEYWORD_ONLY, default=h.default) for h in method.hypers]
    params += [P(o.name, P.KEYWORD_ONLY, default=o.default) for o in method.options if o.public]
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in method.inputs if n not in POSITIONAL_INPUTS]
    signature = inspect.Signature(params)

    def loss(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        options = {o.name: values[o.name] for o in method.options if o.public}
        floats = v.check_hyperparameters(method, values, options)
        model_pred = values["model_pred"]
        v.check_predictions(method.paired, model_pred, values["target"], values.get("ref_pred"))
        inputs = {}
        for name in method.inputs:
            x = values.get(name)
            if x is not None:
                v.check_aux_tensor(name, x, model_pred.device, "a tensor", lambda s: True)
                inputs[name] = x.detach()
        return fn.call(model_pred, values.get("ref_pred"), values["target"], method, floats, options, inputs)

    loss.__name__ = loss.__qualname__ = method.function
    loss.__signature__ = signature
    loss.__doc__ = (
        f"{method.description} (docs/methods.md §{method.section}), from its descriptor. Metrics: "
        f"{', '.join(method.layout.names)}."
    )
    return loss


for _method in REGISTRY.values():
    if not hasattr(sys.modules[__name__], _method.function):
        setattr(sys.modules[__name__], _method.function, generic_loss(_method))

FUNCTIONS = {name: getattr(sys.modules[__name__], method.function) for name, method in REGISTRY.items()}
"""Method name -> its public function (explicit above, or `generic_loss`)."""
