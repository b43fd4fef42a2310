"""The drop-in loss block of jacklishufan/diffusion-kto `train_kto_sd_v1.5.py` (docs/methods.md §2.7, §5),
re-exported by `fastpref.compat`.

Upstream's block chooses its loss with three flags. The combinations that are a fastpref loss
run fused: `--loss kto` with `--halo sigmoid` (any `--bce_offset`: each is a baseline passed to
`kto_loss`) and `--loss cft` (plain MSE, `sft_loss`). Every other value is refused by name
with a ValueError, never computed as the default.
"""

from fastpref import _validate as v
from fastpref.losses import kto_loss, sft_loss
from fastpref.metrics import kto_baseline, row_errors

KTO_LOSSES = ("kto", "cft")
KTO_HALOS = ("sigmoid",)
KTO_BCE_OFFSETS = ("none", "sigmoid", "original")
# What upstream computes for the values fastpref does not run (x = s β (g - kl), s = 2 label - 1,
# g = r - m per row, w the λ of the row's label): why each is refused.
REFUSED_LOSSES = {
    "sft": "upstream computes the label-masked MSE mean_k(labels_k * m_k) over all N rows (no reference), "
    "which no fastpref loss computes",
    "kto_gp": "upstream computes 1 - sigmoid of a batch-mean logit whose value is the all-reduced mean g and "
    "whose gradient is that of mean_k(w_k x_k) / num_processes, which no fastpref loss computes",
    "dpo": "it is among upstream's --loss choices, but upstream's loss block has no 'dpo' branch (it raises)",
}
REFUSED_HALOS = {
    "loss_averse": "mean_k w_k (1 - log sigmoid(x_k))",
    "risk_seeking_1": "mean_k w_k (1 + s_k log sigmoid(-beta (g_k - kl)))",
    "risk_seeking_2": "mean_k w_k (2 - s_k exp(beta (g_k - kl) / 100))",
    "risk_seeking_3": "mean_k w_k (1 - softplus(x_k))",
}


def official_kto_loss(
    model_pred,
    ref_pred,
    target,
    labels,
    *,
    beta_dpo=1000.0,
    lambda_d_kto=1.0,
    lambda_u_kto=1.0,
    kl_reduce=None,
    loss="kto",
    halo="sigmoid",
    bce_offset="none",
    model_pred_roll=None,
    ref_pred_roll=None,
):
    """The loss block of jacklishufan/diffusion-kto `train_kto_sd_v1.5.py`, with its flags and
    defaults (`--loss kto`, `--halo sigmoid`, `--bce_offset none`): unpaired rows [N, ...] of
    model_pred, ref_pred, target (any float dtypes, rank >= 2), `labels` [N] (1 desirable,
    0 undesirable, as upstream; fastpref reads nonzero as desirable).

    kl_reduce: the trainer's cross-process mean of a 0-dim tensor, e.g.
    ``lambda t: accelerator.reduce(t, reduction="mean")``; None: this batch alone (the same
    thing on one process). The baseline `kl`, as upstream, for each `bce_offset`:
      "none":     max(0, reduce(mean_k (r_k - m_k))) (`fastpref.kto_baseline` with kl_reduce);
      "sigmoid":  (reduce(mean of g over desirable rows) + reduce(mean over undesirable)) / 2,
                  each class mean as upstream's sum / (count + 1e-6), not clamped;
      "original": reduce(mean_k (r_roll_k - m_roll_k)) from `model_pred_roll`/`ref_pred_roll`
                  (upstream's policy and reference outputs for the rolled prompts, [N, ...],
                  required with this offset and refused without it), not clamped.
    loss "kto": `kto_loss` with that baseline (halo "sigmoid" only). loss "cft" (a branch of
    upstream's block that its argparse choices omit): the plain MSE (`sft_loss`), kl and acc
    still logged from the reference errors as upstream does. Other `loss`/`halo` values are
    refused by name (ValueError): `REFUSED_LOSSES`, `REFUSED_HALOS`.

    Returns (loss 0-dim float32/float64 with gradient into model_pred, logs) with upstream's
    keys `loss`, `raw_model_loss`, `kl`, `acc` (detached 0-dim). Upstream's other diagnostics
    (`ref_loss`, `likelyhood`, `diff_pos`, `diff_neg`, `n_pos`, `n_neg`) are not documented metrics;
    `fastpref.row_errors` gives the per-row errors they are made of."""
    _check_modes(loss, halo, bce_offset)
    v.check_positive_finite("beta_dpo", beta_dpo)
    v.check_nonnegative("lambda_d_kto", lambda_d_kto)
    v.check_nonnegative("lambda_u_kto", lambda_u_kto)
    if kl_reduce is not None and not callable(kl_reduce):
        raise TypeError(f"kl_reduce must be a callable (tensor -> tensor) or None, got {type(kl_reduce).__name__}")
    v.check_predictions(False, model_pred, target, ref_pred)
    N = model_pred.shape[0]
    v.check_aux_tensor("labels", labels, model_pred.device, f"[N={N}]", lambda s: s == (N,))
    _check_rolls(bce_offset, model_pred, model_pred_roll, ref_pred_roll)

    reduce = kl_reduce if kl_reduce is not None else (lambda t: t)
    desirable = labels != 0
    errors = None
    if bce_offset == "sigmoid" or loss == "cft":
        errors = row_errors(model_pred, target, ref_pred=ref_pred)
    if bce_offset == "none":
        kl = (
            None
            if kl_reduce is None or loss == "cft"
            else kto_baseline(model_pred, target, ref_pred=ref_pred, reduce=kl_reduce)
        )
    elif bce_offset == "sigmoid":
        gap = errors[1] - errors[0]
        kl = (reduce(_class_mean(gap, desirable)) + reduce(_class_mean(gap, ~desirable))) / 2
    else:
        m_roll, r_roll = row_errors(model_pred_roll, target, ref_pred=ref_pred_roll)
        kl = reduce((r_roll - m_roll).mean())
    if kl is not None:
        kl = kl.detach()

    if loss == "kto":
        value, m = kto_loss(
            model_pred,
            ref_pred,
            target,
            labels,
            beta=float(beta_dpo),
            lambda_d=float(lambda_d_kto),
            lambda_u=float(lambda_u_kto),
            kl_baseline=kl,
        )
        return value, {"loss": m["loss"], "raw_model_loss": m["model_mse"], "kl": m["kl"], "acc": m["acc"]}
    # cft: the loss ignores the reference; kl and acc are upstream's diagnostics of it.
    gap = errors[1] - errors[0]
    if kl is None:
        kl = reduce(gap.mean()).clamp(min=0).detach()
    sign = desirable.to(gap.dtype) * 2 - 1
    acc = (sign * float(beta_dpo) * (gap - kl) > 0).to(gap.dtype).mean()
    value, m = sft_loss(model_pred, target)
    return value, {"loss": m["loss"], "raw_model_loss": m["loss"], "kl": kl, "acc": acc}


def _class_mean(gap, mask):
    """Upstream's class-conditional mean: sum over the class / (its count + 1e-6)."""
    weights = mask.to(gap.dtype)
    return (gap * weights).sum() / (weights.sum() + 1e-6)


def _check_modes(loss, halo, bce_offset):
    if loss in REFUSED_LOSSES:
        raise ValueError(
            f"loss={loss!r} is not supported: {REFUSED_LOSSES[loss]} (supported: {', '.join(map(repr, KTO_LOSSES))})"
        )
    v.check_choice("loss", loss, KTO_LOSSES)
    if loss == "kto" and halo in REFUSED_HALOS:
        raise ValueError(
            f"halo={halo!r} is not supported: upstream's loss is then {REFUSED_HALOS[halo]}, "
            f"which no fastpref loss computes (supported: 'sigmoid', the kto_loss utility)"
        )
    # cft ignores the utility, but upstream still evaluates it and stops on an unknown name.
    v.check_choice("halo", halo, KTO_HALOS if loss == "kto" else KTO_HALOS + tuple(REFUSED_HALOS))
    v.check_choice("bce_offset", bce_offset, KTO_BCE_OFFSETS)


def _check_rolls(bce_offset, model_pred, model_pred_roll, ref_pred_roll):
    rolls = {"model_pred_roll": model_pred_roll, "ref_pred_roll": ref_pred_roll}
    if bce_offset != "original":
        given = [name for name, x in rolls.items() if x is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} is used only with bce_offset='original', got bce_offset={bce_offset!r}"
            )
        return
    for name, x in rolls.items():
        if x is None:
            raise ValueError(
                f"{name} is required with bce_offset='original' (upstream's output for the rolled "
                f"prompts, the shape of model_pred {tuple(model_pred.shape)}), got None"
            )
        v.check_like(name, x, "model_pred", model_pred)
