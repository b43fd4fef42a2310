"""Drop-in loss blocks for existing Diffusion-DPO, DSPO, Diffusion-KTO and MaPO trainers (spec §5).

Each function replaces the code between a trainer's model/reference forward and its
`backward()`: it takes the trainer's own tensors and flags, and returns `(loss, logs)` where
`logs` maps the trainer's OWN log keys to detached 0-dim tensors (no host sync: read them
back, or gather them, where the trainer did). The trainer keeps its data pipeline (winners in rows
0..B-1, losers in B..2B-1, shared noise and timestep per pair, reference forward without
gradient) and its logging/accumulation code.

Inputs: model_pred, ref_pred, target of one shape [2B, ...] (KTO: unpaired [N, ...]; rank >= 2;
4-D latents as upstream, any trailing dims work), float16/bfloat16/float32/float64 mixed freely. fastpref
upcasts every element; the official DiffusionDPO/DSPO trainers compute the reference error in
the reference network's dtype (fp16 under their default mixed precision), so numbers agree up
to that fp16 rounding there and to float32 rounding with the diffusers scripts.
"""
from fastpref import _validate
from fastpref.losses import diffusion_dpo_loss, dspo_loss, kto_loss, mapo_loss, sft_loss
from fastpref.metrics import kto_baseline

DIFFUSERS_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def diffusers_dpo_loss(model_pred, ref_pred, target, *, beta_dpo=2500.0, loss_type="sigmoid", sdxl=False):
    """The loss block of huggingface/diffusers `examples/research_projects/diffusion_dpo`.

    sdxl=False: `train_diffusion_dpo.py` (SD1.5; no 0.5 factor, so β = 2 * beta_dpo; default
    `--beta_dpo` 2500); loss_type "sigmoid", "hinge" or "ipo" (ipo with the script's evident
    intent, (logits - 1/(2 beta_dpo))², since upstream reads an undefined `args.beta`).
    sdxl=True: `train_diffusion_dpo_sdxl.py` (β = beta_dpo, its default 5000: pass it); that
    script has only the sigmoid loss.

    Returns (loss 0-dim float32/float64 tensor with gradient into model_pred, logs) with logs
    keys `loss`, `raw_model_loss`, `ref_loss`, `implicit_acc` (ties counted half, as upstream);
    the scripts' `lr` comes from their scheduler."""
    if loss_type not in DIFFUSERS_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, DIFFUSERS_LOSS_TYPES))}; got {loss_type!r}")
    if sdxl and loss_type != "sigmoid":
        raise ValueError(f"loss_type must be 'sigmoid' with sdxl=True (train_diffusion_dpo_sdxl.py has no "
                         f"other loss); got {loss_type!r}")
    _check_beta("beta_dpo", beta_dpo)
    beta = float(beta_dpo) if sdxl else 2.0 * float(beta_dpo)
    loss, m = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, loss_type=loss_type)
    return loss, {"loss": m["loss"], "raw_model_loss": m["model_mse"], "ref_loss": m["ref_mse"],
                  "implicit_acc": m["implicit_acc_ties_half"]}


def official_dpo_loss(model_pred, ref_pred, target, *, beta_dpo=5000.0, sft=False):
    """The loss block of SalesforceAIResearch/DiffusionDPO `train.py` (β = `--beta_dpo`,
    official convention with the 0.5; the launchers pass 5000 for SD1.5 and SDXL).

    Per micro-batch, upstream keeps: the loss (progress-bar key `step_loss`; accumulated into
    `train_loss` as gather(loss).mean() / gradient_accumulation_steps), and for DPO the
    per-micro-batch `model_mse_unaccumulated`, `ref_mse_unaccumulated` and strict
    `implicit_acc` (accumulated into `implicit_acc_accumulated` likewise). logs holds exactly
    those per-micro-batch values: `step_loss`, and for DPO also `model_mse_unaccumulated`,
    `ref_mse_unaccumulated`, `implicit_acc`; the accumulations stay in the trainer.

    sft=True (`--sft`): the batch holds only the preferred images ([N, ...]); ref_pred is
    ignored (pass None) and the loss is the plain MSE; logs has `step_loss` only."""
    if sft:
        loss, m = sft_loss(model_pred, target)
        return loss, {"step_loss": m["loss"]}
    _check_beta("beta_dpo", beta_dpo)
    loss, m = diffusion_dpo_loss(model_pred, ref_pred, target, beta=float(beta_dpo))
    return loss, _official_logs(m)


def official_dspo_loss(model_pred, ref_pred, target, *, beta_dpo, sdxl=False, sft=False):
    """The loss block of huaishengzhu/DSPO `train.py`. beta_dpo is required: upstream's argparse
    default (5000) differs from its SD1.5 launcher (0.001); its SDXL launcher passes 5000 with
    `--sdxl`. The SDXL branch threshold is upstream's fixed 0.1, decided on the device.

    logs as `official_dpo_loss` (`step_loss`, `model_mse_unaccumulated`,
    `ref_mse_unaccumulated`, strict `implicit_acc`; sft=True: `step_loss` only, ref_pred
    ignored)."""
    if sft:
        loss, m = sft_loss(model_pred, target)
        return loss, {"step_loss": m["loss"]}
    _check_beta("beta_dpo", beta_dpo)
    loss, m = dspo_loss(model_pred, ref_pred, target, beta=float(beta_dpo),
                        variant="sdxl" if sdxl else "sd15", sdxl_threshold=0.1)
    return loss, _official_logs(m)


def official_kto_loss(model_pred, ref_pred, target, labels, *, beta_dpo=1000.0, lambda_d_kto=1.0,
                      lambda_u_kto=1.0, kl_reduce=None):
    """The loss block of jacklishufan/diffusion-kto `train_kto_sd_v1.5.py` with its defaults
    (`--loss kto`, `--halo sigmoid`, `--bce_offset none`): unpaired rows [N, ...], `labels` [N]
    (1 desirable, 0 undesirable; fastpref reads nonzero as desirable).

    kl_reduce: the trainer's cross-process mean of a 0-dim tensor, e.g.
    ``lambda t: accelerator.reduce(t, reduction="mean")``. Upstream averages the per-process
    baseline mean(r - m) over processes and clamps it at 0; with kl_reduce given, that baseline
    is `fastpref.kto_baseline` (one more fused read of the inputs), passed to the loss. None:
    the batch's own baseline (the same thing on one process).

    Returns (loss, logs) with upstream's keys `loss`, `raw_model_loss`, `kl`, `acc`. Upstream's
    other diagnostics (`ref_loss`, `likelyhood`, `diff_pos`, `diff_neg`, `n_pos`, `n_neg`) are
    not spec metrics; `fastpref.row_errors` gives the per-row errors they are made of."""
    _check_beta("beta_dpo", beta_dpo)
    _validate.check_nonnegative("lambda_d_kto", lambda_d_kto)
    _validate.check_nonnegative("lambda_u_kto", lambda_u_kto)
    if kl_reduce is not None and not callable(kl_reduce):
        raise TypeError(f"kl_reduce must be a callable (tensor -> tensor) or None, got {type(kl_reduce).__name__}")
    kl_baseline = None if kl_reduce is None else kto_baseline(model_pred, target, ref_pred=ref_pred,
                                                                reduce=kl_reduce)
    loss, m = kto_loss(model_pred, ref_pred, target, labels, beta=float(beta_dpo), lambda_d=float(lambda_d_kto),
                       lambda_u=float(lambda_u_kto), kl_baseline=kl_baseline)
    return loss, {"loss": m["loss"], "raw_model_loss": m["model_mse"], "kl": m["kl"], "acc": m["acc"]}


def mapo_compute_loss(model_pred, target, *, beta_mapo=0.1, snr_value=0.5, num_train_timesteps=1000):
    """`compute_loss` of mapo-t2i/mapo `utils.py` (used by its `train.py` and
    `train_with_lora.py`), reference-free, paired [2B, ...]; pass the noise scheduler's
    `config.num_train_timesteps`.

    Returns (loss, logs) with the keys of upstream's log dict: `total loss`, `Win Score`,
    `Lose Score`, `OR loss`, `model_losses_w`, `model_losses_l` (batch means, as logged)."""
    _check_beta("beta_mapo", beta_mapo)
    loss, m = mapo_loss(model_pred, target, beta=float(beta_mapo), snr_value=snr_value,
                        num_train_timesteps=num_train_timesteps)
    return loss, {"total loss": m["loss"], "Win Score": m["win_score"], "Lose Score": m["lose_score"],
                  "OR loss": m["or_loss"], "model_losses_w": m["model_mse_w"], "model_losses_l": m["model_mse_l"]}


def _official_logs(m):
    return {"step_loss": m["loss"], "model_mse_unaccumulated": m["model_mse"],
            "ref_mse_unaccumulated": m["ref_mse"], "implicit_acc": m["implicit_acc"]}


def _check_beta(name, value):
    _validate.check_positive_finite(name, value)
