"""The autograd Function of the fused losses, one for every method.

Forward: row sums (1 launch) + the method's head (1 launch), which also leaves the per-row
gradient coefficients. Backward: one elementwise launch. Saved state is O(B) plus references
to the inputs; no full-size temporary besides the gradient itself.

`FusedLossFunction.apply(model_pred, ref_pred, target, launch)` runs any method: `launch` (a
`Launch`) names its descriptor and carries its hyperparameters, options and extra inputs by
name. The Function does not validate its inputs: the functions of `fastpref.losses` do, then
call `run`. It returns (loss, stats, ints); the descriptor's `layout.unpack` names them.

The per-method classes below (DiffusionDPOFunction, ...) keep the positional `apply`
signatures of earlier releases, on top of the same Function.
"""

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from fastpref._validate import compute_dtype
from fastpref.kernels import REGISTRY, Method, elementwise_grad, row_sums, run_head


def _as_rows(x):
    """[R, ...] -> [R, n] view with unit stride along n (a copy only for layouts that need one)."""
    if x is None:
        return None
    rows = x.reshape(x.shape[0], -1)
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@dataclasses.dataclass(frozen=True)
class Launch:
    """What one call runs: the method, its float hyperparameters, options and extra input
    tensors by name (see kernels/method.py), and `count` (pairs B, or the rows a row method
    keeps; None: B = rows / 2 for paired methods, every row otherwise)."""

    method: Method
    floats: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    inputs: dict = dataclasses.field(default_factory=dict)
    count: int | None = None


class FusedLossFunction(torch.autograd.Function):
    """apply(model_pred, ref_pred or None, target, launch) -> (loss, stats, ints)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, launch):
        method = launch.method
        p, r, t = _as_rows(model_pred), _as_rows(ref_pred), _as_rows(target)
        count = launch.count
        if count is None:
            count = p.shape[0] // 2 if method.paired else p.shape[0]
        partials, splits = row_sums(p, r, t, compute_dtype(model_pred, ref_pred, target), cross=method.cross)
        loss, stats, ints, coef = run_head(
            method, partials, splits, p.shape[0], count, p.shape[1], launch.floats, launch.options, launch.inputs
        )
        ctx.save_for_backward(p, r if method.has_b else None, t, coef)
        ctx.has_b = method.has_b
        ctx.shape = model_pred.shape
        ctx.mark_non_differentiable(stats, ints)
        ctx.set_materialize_grads(False)  # no zero-filled grads for the metric outputs
        return loss, stats, ints

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats, grad_ints):
        p, r, t, coef = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = elementwise_grad(p, r, t, coef, grad_loss, ctx.has_b).view(ctx.shape)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def run(model_pred, ref_pred, target, launch, drop=()):
    """Run `launch` and name its outputs: (loss, metrics dict of views into the stats buffers)."""
    loss, stats, ints = FusedLossFunction.apply(model_pred, ref_pred, target, launch)
    pairs = model_pred.shape[0] // 2 if launch.method.paired else 0
    return loss, launch.method.layout.unpack(stats, ints, pairs, drop)


class DiffusionDPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, loss_type_id: 0 sigmoid, 1 hinge, 2 ipo)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, loss_type_id):
        loss_type = REGISTRY["dpo"].options[0].choices[loss_type_id]
        return FusedLossFunction.forward(
            ctx, model_pred, ref_pred, target, Launch(REGISTRY["dpo"], {"beta": beta}, {"loss_type": loss_type})
        )


class SFTFunction(FusedLossFunction):
    """apply(model_pred [N,...], target, winners_only: bool)."""

    @staticmethod
    def forward(ctx, model_pred, target, winners_only):
        keep = model_pred.shape[0] // 2 if winners_only else model_pred.shape[0]
        return FusedLossFunction.forward(ctx, model_pred, None, target, Launch(REGISTRY["sft"], count=keep))


class DSPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, variant_id: 0 sd15 / 1 sdxl, sdxl_threshold)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, variant_id, sdxl_threshold):
        method = REGISTRY["dspo"]
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(
                method,
                {"beta": beta, "sdxl_threshold": sdxl_threshold},
                {"variant": method.options[0].choices[variant_id]},
            ),
        )


class RPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, emb_w [B,D] or None, emb_l [B,D] or None, beta, tau)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, emb_w, emb_l, beta, tau):
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(
                REGISTRY["rpo"],
                {"beta": beta, "tau": tau},
                {"has_emb": emb_w is not None},
                {"emb_w": emb_w, "emb_l": emb_l},
            ),
        )


class RPODiagonalFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, diagonal_weight)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, diagonal_weight):
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(REGISTRY["rpo_diagonal"], {"beta": beta, "diagonal_weight": diagonal_weight}),
        )


class SSPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...] (winners, then self-samples), ref_pred, target, beta,
    criterion_id: 0 indicator / 1 sign)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, criterion_id):
        method = REGISTRY["sspo"]
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(method, {"beta": beta}, {"criterion": method.options[0].choices[criterion_id]}),
        )


class DenseDPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, timesteps [B] or [2B], beta, gamma,
    num_inference_steps, num_train_timesteps, weight_scale)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, timesteps, beta, gamma, steps, train_steps, scale):
        floats = {
            "beta": beta,
            "gamma": gamma,
            "num_inference_steps": steps,
            "num_train_timesteps": train_steps,
            "weight_scale": scale,
        }
        return FusedLossFunction.forward(
            ctx, model_pred, ref_pred, target, Launch(REGISTRY["dense_dpo"], floats, inputs={"timesteps": timesteps})
        )


class KTOFunction(FusedLossFunction):
    """apply(model_pred [N,...], ref_pred, target, labels [N], beta, lambda_d, lambda_u,
    kl_mode: 0 batch / 1 float / 2 tensor, kl_value: float, kl_tensor: 0-dim tensor or None)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, labels, beta, lambda_d, lambda_u, kl_mode, kl_value, kl_tensor):
        floats = {"beta": beta, "lambda_d": lambda_d, "lambda_u": lambda_u, "kl_value": kl_value}
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(
                REGISTRY["kto"],
                floats,
                {"kl_mode": ("batch", "value", "tensor")[kl_mode]},
                {"labels": labels, "kl_tensor": kl_tensor},
            ),
        )


class MaPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], target, beta, snr_value, num_train_timesteps)."""

    @staticmethod
    def forward(ctx, model_pred, target, beta, snr_value, train_steps):
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            None,
            target,
            Launch(REGISTRY["mapo"], {"beta": beta, "snr_value": snr_value, "num_train_timesteps": train_steps}),
        )


class SDPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, base_id: 0 dpo / 1 dspo sd15 / 2 dspo sdxl /
    3 dmpo, safeguard, beta, mu, eps, max_scale, sdxl_threshold, dmpo_alpha)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, base_id, safeguard, beta, mu, eps, max_scale, threshold, alpha):
        base, variant = (("dpo", "sd15"), ("dspo", "sd15"), ("dspo", "sdxl"), ("dmpo", "sd15"))[base_id]
        floats = {
            "beta": beta,
            "mu": mu,
            "eps": eps,
            "max_scale": max_scale,
            "sdxl_threshold": threshold,
            "dmpo_alpha": alpha,
        }
        return FusedLossFunction.forward(
            ctx,
            model_pred,
            ref_pred,
            target,
            Launch(REGISTRY["sdpo"], floats, {"base": base, "dspo_variant": variant, "safeguard": bool(safeguard)}),
        )


class DMPOFunction(FusedLossFunction):
    """apply(model_pred [2B,...], ref_pred, target, beta, alpha)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, beta, alpha):
        return FusedLossFunction.forward(
            ctx, model_pred, ref_pred, target, Launch(REGISTRY["dmpo"], {"beta": beta, "alpha": alpha})
        )
