"""Drop-in loss blocks for existing Diffusion-DPO, DSPO, Diffusion-KTO, MaPO and Diffusion-SDPO
trainers and the flow-matching DPO trainers of flow_grpo and SimpleTuner (docs/methods.md §5, §7).

Each function replaces the code between a trainer's model/reference forward and its
`backward()`: it takes the trainer's own tensors and flags, and returns `(loss, logs)` where
`logs` maps the trainer's OWN log keys to detached 0-dim tensors (no host sync: read them
back, or gather them, where the trainer did). The trainer keeps its data pipeline (winners in rows
0..B-1, losers in B..2B-1, shared noise and timestep per pair, reference forward without
gradient) and its logging/accumulation code.

Inputs: model_pred, ref_pred, target of one shape [2B, ...] (KTO: unpaired [N, ...]; rank >= 2;
4-D latents as upstream, any trailing dims work: a row is averaged whole, where the official
DiffusionDPO/DSPO/SDPO blocks average dims 1-3 only and so mis-handle 5-D video latents),
float16/bfloat16/float32/float64 mixed freely. fastpref upcasts every element; the official
DiffusionDPO/DSPO/SDPO trainers compute the reference error in the reference network's dtype
(fp16/bf16 under their mixed precision), so their numbers differ by that rounding there
(README, "Drop-in"), and by float32 rounding from the diffusers, diffusion-kto and MaPO scripts.

Per trainer: `diffusers_dpo_loss` (huggingface/diffusers), `official_dpo_loss`
(SalesforceAIResearch/DiffusionDPO), `official_dspo_loss` (huaishengzhu/DSPO),
`official_kto_loss` (jacklishufan/diffusion-kto, `fastpref.compat_kto`), `mapo_compute_loss`
(mapo-t2i/mapo), `official_sdpo_loss` (AIDC-AI/Diffusion-SDPO, `fastpref.compat_sdpo`),
`flow_grpo_dpo_loss` (yifan123/flow_grpo `scripts/train_sd3_dpo.py`) and `SimpleTunerFlowDPO`
(bghira/SimpleTuner's Flow-DPO distiller; one instance per run), both in `fastpref.compat_flow`.
"""

from fastpref import _validate
from fastpref.compat_flow import SimpleTunerFlowDPO, flow_grpo_dpo_loss
from fastpref.compat_kto import official_kto_loss
from fastpref.compat_sdpo import official_sdpo_loss
from fastpref.losses import diffusion_dpo_loss, dspo_loss, mapo_loss, sft_loss

__all__ = [
    "DIFFUSERS_LOSS_TYPES",
    "diffusers_dpo_loss",
    "official_dpo_loss",
    "official_dspo_loss",
    "official_kto_loss",
    "mapo_compute_loss",
    "official_sdpo_loss",
    "flow_grpo_dpo_loss",
    "SimpleTunerFlowDPO",
]

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
        raise ValueError(
            f"loss_type must be 'sigmoid' with sdxl=True (train_diffusion_dpo_sdxl.py has no "
            f"other loss); got {loss_type!r}"
        )
    _check_beta("beta_dpo", beta_dpo)
    beta = float(beta_dpo) if sdxl else 2.0 * float(beta_dpo)
    loss, m = diffusion_dpo_loss(model_pred, ref_pred, target, beta=beta, loss_type=loss_type)
    return loss, {
        "loss": m["loss"],
        "raw_model_loss": m["model_mse"],
        "ref_loss": m["ref_mse"],
        "implicit_acc": m["implicit_acc_ties_half"],
    }


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
    loss, m = dspo_loss(
        model_pred, ref_pred, target, beta=float(beta_dpo), variant="sdxl" if sdxl else "sd15", sdxl_threshold=0.1
    )
    return loss, _official_logs(m)


def mapo_compute_loss(model_pred, target, *, beta_mapo=0.1, snr_value=0.5, num_train_timesteps=1000):
    """`compute_loss` of mapo-t2i/mapo `utils.py` (used by its `train.py` and
    `train_with_lora.py`), reference-free, paired [2B, ...]; pass the noise scheduler's
    `config.num_train_timesteps`.

    Returns (loss, logs) with the keys of upstream's log dict: `total loss`, `Win Score`,
    `Lose Score`, `OR loss`, `model_losses_w`, `model_losses_l` (batch means, as logged)."""
    _check_beta("beta_mapo", beta_mapo)
    loss, m = mapo_loss(
        model_pred, target, beta=float(beta_mapo), snr_value=snr_value, num_train_timesteps=num_train_timesteps
    )
    return loss, {
        "total loss": m["loss"],
        "Win Score": m["win_score"],
        "Lose Score": m["lose_score"],
        "OR loss": m["or_loss"],
        "model_losses_w": m["model_mse_w"],
        "model_losses_l": m["model_mse_l"],
    }


def _official_logs(m):
    return {
        "step_loss": m["loss"],
        "model_mse_unaccumulated": m["model_mse"],
        "ref_mse_unaccumulated": m["ref_mse"],
        "implicit_acc": m["implicit_acc"],
    }


def _check_beta(name, value):
    _validate.check_positive_finite(name, value)
