"""The public losses. Each validates its inputs (before any launch), runs the fused
Function and returns `(loss, metrics)`: a 0-dim tensor in the compute dtype (float32, or
float64 for float64 inputs) and a dict of detached tensors with the spec's keys.

Layout: model_pred, ref_pred, target are [2B, ...] (rank >= 2, any trailing dims), winners in
rows 0..B-1, their losers in rows B..2B-1; dtypes float16/bfloat16/float32/float64, mixed
freely. The gradient flows into model_pred only, in model_pred's dtype.
"""
from fastpref import _validate as v
from fastpref.functions import DiffusionDPOFunction, DSPOFunction, SFTFunction
from fastpref.kernels import HEADS
from fastpref.kernels.heads import dpo, dspo


def _metrics(name, stats, ints, pairs):
    return HEADS[name].unpack(stats, ints, pairs)


def diffusion_dpo_loss(model_pred, ref_pred, target, *, beta=5000.0, loss_type="sigmoid"):
    """Diffusion-DPO (spec §2.1), β in the official convention (diffusers SD1.5 `beta_dpo` x 2).

    loss_type: "sigmoid" (mean softplus(-inside)), "hinge" or "ipo". Metrics: loss,
    implicit_acc, implicit_acc_ties_half, model_mse, ref_mse, model_mse_w, model_mse_l,
    ref_mse_w, ref_mse_l, inside_term ([B])."""
    v.check_predictions(True, model_pred, target, ref_pred)
    v.check_positive_finite("beta", beta)
    type_id = v.check_choice("loss_type", loss_type, dpo.LOSS_TYPES)
    loss, stats, ints = DiffusionDPOFunction.apply(model_pred, ref_pred, target, float(beta), type_id)
    return loss, _metrics("dpo", stats, ints, model_pred.shape[0] // 2)


def sft_loss(model_pred, target, *, winners_only=False):
    """SFT baseline (spec §2.2): mean squared error over every element of the kept rows.

    model_pred, target: [N, ...]; winners_only=True keeps rows 0..N/2-1 of a paired batch (the
    losers get zero gradient). Metrics: loss."""
    v.check_predictions(bool(winners_only), model_pred, target)
    loss, stats, ints = SFTFunction.apply(model_pred, target, bool(winners_only))
    return loss, _metrics("sft", stats, ints, 0)


def dspo_loss(model_pred, ref_pred, target, *, beta=0.001, variant="sd15", sdxl_threshold=0.1):
    """DSPO (spec §2.3). variant "sd15" or "sdxl"; the sdxl branch (q >= sdxl_threshold: 1,
    else 2) is chosen on the device. Metrics: loss, implicit_acc, model_mse, ref_mse,
    weight_mean, sdxl_branch (0-dim int64: 0 for sd15)."""
    v.check_predictions(True, model_pred, target, ref_pred)
    v.check_positive_finite("beta", beta)
    v.check_finite("sdxl_threshold", sdxl_threshold)
    variant_id = v.check_choice("variant", variant, dspo.VARIANTS)
    loss, stats, ints = DSPOFunction.apply(
        model_pred, ref_pred, target, float(beta), variant_id, float(sdxl_threshold))
    return loss, _metrics("dspo", stats, ints, model_pred.shape[0] // 2)
