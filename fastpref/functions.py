"""The autograd Function of the fused losses, one for every method, and `run`, the call every
public loss makes.

Forward: row sums (1 launch) + the method's head (1 launch; or both in one launch, opt-in:
`fastpref.kernels._runtime.set_one_launch`), which also leaves the per-row gradient
coefficients. Backward: one elementwise launch. Saved state is O(B) plus references to the
inputs; no full-size temporary besides the gradient itself. The loss, metrics, coefficients and
partial sums of a call live in two allocations: the 0-dim loss and one buffer that every other
output is a view of.

`run` calls the kernels through `FusedLossFunction` in eager mode, and through the custom
operator ``torch.ops.fastpref.fused_loss`` (fastpref/ops.py) when the call is traced
(torch.compile, torch.export, FakeTensor or meta inputs); both run the same kernel calls
(`fastpref.ops.forward` / `backward`) and give the same numbers.

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

from fastpref import ops
from fastpref.kernels import REGISTRY, Method
from fastpref.kernels.head import encode_options, plan
from fastpref.loss_metrics import LossMetrics


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


_EMPTY = {}
_NO_INPUTS = ()
_PLANS = {}


def _plan(method, options):
    """The `kernels.head.HeadPlan` of a call's options dict, cached by its items."""
    key = (method.name, *options.items())
    found = _PLANS.get(key)
    if found is None or found.method is not method:
        found = _PLANS[key] = plan(method, encode_options(method, options))
    return found


def _floats(method, floats):
    """The head's float parameters in head order, from the dict of a call."""
    try:
        return tuple(map(floats.__getitem__, method.float_params))
    except KeyError:
        missing = [name for name in method.float_params if name not in floats]
        raise TypeError(f"head of {method.name!r}: no value for its parameter(s) {missing}") from None


class _Fused(torch.autograd.Function):
    """The eager path: apply(model_pred, ref_pred, target, (plan, floats, inputs, count, out)) ->
    loss. The output buffer is handed back through the list `out` rather than as an output
    (made under no grad inside forward, it needs none of autograd's output handling)."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, args):
        hp, floats, inputs, count, out = args
        loss, buf, saved = ops.forward(model_pred, ref_pred, target, hp, floats, inputs, count)
        ctx.saved = saved  # the inputs (or their row copies) and the buffer: no version checks
        out.append(buf)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Only model_pred can need a gradient (the losses refuse ref_pred / target that require
        # one), so backward runs only when it does.
        if torch.is_grad_enabled():  # create_graph=True: this gradient is not differentiable
            return _once(ctx, grad_loss)
        return ops.backward(ctx.saved, grad_loss), None, None, None


@once_differentiable
def _once(ctx, grad_loss):
    return ops.backward(ctx.saved, grad_loss), None, None, None


# `_Fused.apply` without `Function.apply`'s Python preamble (argument binding for setup_context,
# which _Fused does not define, and functorch's unwrapping: `ops.traced` sends a call made under
# a functorch transform to the operator instead).
_apply = super(torch.autograd.Function, _Fused).apply


class FusedLossFunction(torch.autograd.Function):
    """apply(model_pred, ref_pred or None, target, launch) -> (loss, stats, ints): the stats and
    int64 metrics buffers (`Layout.unpack` names them). The same kernel calls as `run`."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target, launch):
        method = launch.method
        hp = _plan(method, launch.options)
        inputs = [launch.inputs.get(name) for name in method.inputs]
        count = _count(method, model_pred.shape[0], launch.count)
        floats = _floats(method, launch.floats)
        loss, buf, saved = ops.forward(model_pred, ref_pred, target, hp, floats, inputs, count)
        start = len(method.layout.ints) * (8 // buf.element_size())
        stats = buf[start : start + method.layout.size(model_pred.shape[0] // 2 if method.paired else 0)]
        ints = buf[:start].view(torch.int64) if method.layout.ints else buf.new_empty(0, dtype=torch.int64)
        ctx.saved = saved
        ctx.mark_non_differentiable(stats, ints)
        ctx.set_materialize_grads(False)  # no zero-filled grads for the metric outputs
        return loss, stats, ints

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_stats, grad_ints):
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            grad = ops.backward(ctx.saved, grad_loss)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _count(method, rows, count):
    if count is None:
        return rows // 2 if method.paired else rows
    return count


def call(model_pred, ref_pred, target, method, floats=_EMPTY, options=_EMPTY, inputs=_EMPTY, count=None, drop=()):
    """Run `method` (its float hyperparameters, options and extra inputs by name; count as in
    `Launch`) and name its outputs: (loss, metrics of views into the output buffer: a
    `LossMetrics` whose views are made on first access in eager mode, a dict when traced)."""
    rows = model_pred.shape[0]
    pairs = rows // 2 if method.paired else 0
    if count is None:
        count = pairs if method.paired else rows
    inputs = [inputs.get(name) for name in method.inputs] if method.inputs else _NO_INPUTS
    if ops.traced(model_pred):
        values = [float(x) for x in _floats(method, floats)]
        encoded = encode_options(method, options)
        loss, buf = torch.ops.fastpref.fused_loss(
            model_pred, ref_pred, target, list(inputs), method.name, encoded, values, count
        )
        return loss, method.layout.metrics(buf, pairs, drop)
    out = []
    loss = _apply(model_pred, ref_pred, target, (_plan(method, options), _floats(method, floats), inputs, count, out))
    return loss, LossMetrics.of_call(method.layout, out[0], pairs, drop)


def run(model_pred, ref_pred, target, launch, drop=()):
    """`call` with a `Launch`."""
    return call(
        model_pred, ref_pred, target, launch.method, launch.floats, launch.options, launch.inputs, launch.count, drop
    )


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
