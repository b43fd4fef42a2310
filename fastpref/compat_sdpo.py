"""The drop-in loss block of AIDC-AI/Diffusion-SDPO `train.py` (docs/methods.md §2.9, §2.10, §5),
re-exported by `fastpref.compat`: its DPO, DSPO and DMPO bases, each with or without the
winner-preserving safeguard, and `train_method sft` (its `--sft` flag is parsed but unused
upstream), under upstream's flag names and argparse defaults."""

from fastpref import _validate as v
from fastpref.losses import sdpo_loss, sft_loss

SDPO_TRAIN_METHODS = ("diffusion-dpo", "dspo", "dmpo", "sft")
_BASES = {"diffusion-dpo": "dpo", "dspo": "dspo", "dmpo": "dmpo"}


def official_sdpo_loss(
    model_pred,
    ref_pred,
    target,
    *,
    train_method="diffusion-dpo",
    beta_dpo=5000.0,
    sdxl=False,
    use_winner_preserving=False,
    winner_preserving_mu=0.0,
    dmpo_alpha=0.0,
):
    """The loss block of AIDC-AI/Diffusion-SDPO `train.py` (between its loss-computation markers),
    with its flags and argparse defaults: `--train_method` (diffusion-dpo, dspo, dmpo, sft),
    `--beta_dpo` 5000 (official convention, 0.5 included), `--sdxl` (DSPO's SDXL objective,
    branch threshold 0.1 fixed upstream, chosen on the device), `--use_winner_preserving` off,
    `--winner_preserving_mu` 0.0 and `--dmpo_alpha` 0.0. Upstream's launchers pass their own
    values (e.g. SD1.5 DPO: 5000, mu 0.9; DMPO: 2000, alpha 0.01); pass the trainer's `args`.
    Note fastpref.sdpo_loss's own defaults differ (mu 0.9, dmpo_alpha 0.01).

    model_pred, ref_pred, target: paired [2B, ...] (winners first), float16/bfloat16/float32/
    float64 mixed freely, upcast elementwise (upstream forms errors in the inputs' promoted dtype).
    Maps onto `fastpref.sdpo_loss(beta=beta_dpo, mu=winner_preserving_mu, base=dpo|dspo|dmpo,
    safeguard=use_winner_preserving, eps=1e-9, max_scale=1.0, dmpo_alpha=dmpo_alpha)`, upstream's
    λ constants; train_method "sft": `sft_loss` on the winners-only batch [N, ...], ref_pred
    ignored (pass None).

    Returns (loss 0-dim float32/float64 with gradient into model_pred, logs): detached 0-dim
    per-micro-batch values under the names upstream gathers and logs them: `step_loss` (the
    loss), `model_mse_unaccumulated`, `ref_mse_unaccumulated`, `implicit_acc` (strict),
    `avg_win_diff_loss` (mean_i m_w - r_w), `avg_lose_diff_loss` (mean_i m_l - r_l),
    `avg_lose_l_scale` (λ; 1 without the safeguard); "sft": `step_loss` only."""
    v.check_choice("train_method", train_method, SDPO_TRAIN_METHODS)
    if train_method == "sft":
        loss, m = sft_loss(model_pred, target)
        return loss, {"step_loss": m["loss"]}
    v.check_positive_finite("beta_dpo", beta_dpo)
    v.check_range("winner_preserving_mu", winner_preserving_mu, 0.0, 1.0)
    v.check_finite("dmpo_alpha", dmpo_alpha)
    loss, m = sdpo_loss(
        model_pred,
        ref_pred,
        target,
        beta=float(beta_dpo),
        mu=float(winner_preserving_mu),
        base=_BASES[train_method],
        safeguard=bool(use_winner_preserving),
        eps=1e-9,
        max_scale=1.0,
        dspo_variant="sdxl" if sdxl else "sd15",
        sdxl_threshold=0.1,
        dmpo_alpha=float(dmpo_alpha),
    )
    return loss, {
        "step_loss": m["loss"],
        "model_mse_unaccumulated": m["model_mse"],
        "ref_mse_unaccumulated": m["ref_mse"],
        "implicit_acc": m["implicit_acc"],
        "avg_win_diff_loss": m["win_diff"],
        "avg_lose_diff_loss": m["lose_diff"],
        "avg_lose_l_scale": m["loser_grad_scale"],
    }
