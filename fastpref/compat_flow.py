"""Drop-in loss blocks of the flow-matching DPO trainers (docs/methods.md §5, §7), re-exported by
`fastpref.compat`:

- `flow_grpo_dpo_loss`: yifan123/flow_grpo `scripts/train_sd3_dpo.py` (per-row means, β in
  the official convention: fastpref's β is its `config.train.beta`).
- `SimpleTunerFlowDPO`: bghira/SimpleTuner `FlowDPODistiller.compute_distill_loss`
  (`simpletuner/helpers/distillation/flow_dpo/distiller.py`): per-row sums by default, so
  fastpref's β is SimpleTuner's β times N, the elements per row; its `mean` and
  `masked_mean` reductions, optional loss mask, anchor and SFT terms, and its automatic β
  (a running mean of |margin| kept on the device, so no host sync).

Both compute the preference term with `fastpref.diffusion_dpo_loss` (and the anchor with
`fastpref.sft_loss`); neither reads a tensor value back to the host.
"""

import torch

from fastpref import _validate as v
from fastpref.losses import diffusion_dpo_loss, sft_loss

SIMPLETUNER_NORM_TYPES = ("sum", "mean", "masked_mean")


def flow_grpo_dpo_loss(model_pred, model_pred_ref, target, *, beta):
    """The loss block of yifan123/flow_grpo `scripts/train_sd3_dpo.py` (docs/methods.md §7):
    `-log σ(-0.5 β ((m_w - r_w) - (m_l - r_l)))` averaged over the pairs, m and r the per-row
    means of the float upcast squared errors. beta: the script's `config.train.beta`, required
    (its DPO configs set 100; `config/base.py`'s 0.0 is GRPO's KL ratio and is refused here:
    with β = 0 the loss is log 2 with zero gradient). fastpref's β is that β unchanged.

    model_pred, model_pred_ref, target: [2B, ...] as the script builds them (chosen rows
    0..B-1, rejected rows B..2B-1, shared noise and timestep per pair, target noise - x0),
    float16/bfloat16/float32/float64 mixed freely (upstream upcasts to float32 too).

    Returns (loss 0-dim float32/float64 with gradient into model_pred, logs): detached 0-dim
    per-micro-batch values under the keys the script appends to its `info` lists: `loss`,
    `model_w_err`, `model_l_err`, `ref_w_err`, `ref_l_err` (means over the pairs), `w_diff`,
    `l_diff`, `w_l_diff`, `inside_term` (means of those per-pair values) and the strict
    `implicit_acc`. The script's epoch-end mean over its lists and `accelerator.reduce` stay
    the trainer's. `w_l_diff` is read from the fused `inside_term` (-2 mean(inside) / β), so it
    equals `w_diff - l_diff` only up to their float32 rounding."""
    if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta == 0:
        raise ValueError(
            "beta (config.train.beta) must be finite and > 0, got 0: flow_grpo's config/base.py default 0.0 is "
            "GRPO's KL ratio, its DPO configs (config/dpo.py) set 100; with 0 the DPO loss is log 2 with zero gradient"
        )
    v.check_positive_finite("beta", beta)
    v.check_prediction("model_pred", model_pred)
    v.check_like("model_pred_ref", model_pred_ref, "model_pred", model_pred)
    v.check_constant("model_pred_ref", model_pred_ref)
    loss, m = diffusion_dpo_loss(model_pred, model_pred_ref, target, beta=float(beta))
    return loss, {
        "loss": m["loss"],
        "model_w_err": m["model_mse_w"],
        "model_l_err": m["model_mse_l"],
        "ref_w_err": m["ref_mse_w"],
        "ref_l_err": m["ref_mse_l"],
        "w_diff": m["model_mse_w"] - m["ref_mse_w"],
        "l_diff": m["model_mse_l"] - m["ref_mse_l"],
        "w_l_diff": m["inside_term"].mean() * (-2.0 / float(beta)),
        "inside_term": m["inside_term"].mean(),
        "implicit_acc": m["implicit_acc"],
    }


class SimpleTunerFlowDPO:
    """The loss block of bghira/SimpleTuner `FlowDPODistiller.compute_distill_loss` (Flow-DPO,
    `--distillation_method=flow_dpo`; docs/methods.md §7), with the keys and defaults of the
    distiller's `_DEFAULTS` as keyword arguments (`CONFIG_KEYS`; `distillation_type` and
    `mask_dilate` are not loss settings: the trainer builds the mask). One instance per run: it
    keeps the automatic β's running mean, as the distiller does.

    Reduction `norm_type` ("sum", default; "mean"; "masked_mean") of each row's squared error
    (times the mask, when one is given), N elements per row:
      "sum":         fastpref β = beta · N (SD3 at 512 px: N = 16·64·64 = 65,536);
      "mean":        fastpref β = beta;
      "masked_mean": the sum over the row divided by max(1, the row's mask sum over all its
                     elements), which is "mean" without a mask.
    beta is used when auto_beta is off or auto_beta_target_gf <= 0 (finite, > 0). With
    auto_beta (SimpleTuner's default), each call sets β = clamp(-2 logit(g) / max(ema, eps),
    auto_beta_min, auto_beta_max), g = auto_beta_target_gf clamped into [eps, 1 - eps] and
    ema the running mean (decay auto_beta_decay, first value the first call's) of
    mean_i |margin_i| in SimpleTuner's units, after `margin_reduce` (a 0-dim tensor's mean
    over processes, e.g. ``lambda t: accelerator.gather(t.reshape(1)).mean()`` as the
    distiller does on several processes; None: this process alone). The running mean stays on
    the device (`margin_ema`, a 0-dim float64 tensor, None before the first call); the margin
    costs one extra forward-only pass over the inputs (the fused DPO forward), and the preference term then
    runs on inputs scaled by sqrt(β), which is β in the loss with no host read.

    Loss, as upstream: `loss_weight · dpo_loss + anchor_alpha · mean((policy - ref)²)` over
    both sides and every element, unmasked (`fastpref.sft_loss`; only if anchor_alpha != 0),
    `+ sft_loss_weight · original_loss` (only if sft_loss_weight != 0; original_loss, the
    trainer's own loss, a 0-dim tensor, is then required). None for anchor_alpha,
    sft_loss_weight or auto_beta_target_gf reads as 0, as upstream."""

    CONFIG_KEYS = (
        "beta",
        "loss_weight",
        "sft_loss_weight",
        "anchor_alpha",
        "norm_type",
        "auto_beta",
        "auto_beta_target_gf",
        "auto_beta_decay",
        "auto_beta_min",
        "auto_beta_max",
        "auto_beta_eps",
    )

    def __init__(
        self,
        *,
        beta=1.0,
        loss_weight=1.0,
        sft_loss_weight=0.0,
        anchor_alpha=0.0,
        norm_type="sum",
        auto_beta=True,
        auto_beta_target_gf=0.2,
        auto_beta_decay=0.99,
        auto_beta_min=1e-3,
        auto_beta_max=1.0,
        auto_beta_eps=1e-6,
        margin_reduce=None,
    ):
        norm_type = str(norm_type).lower()
        v.check_choice("norm_type", norm_type, SIMPLETUNER_NORM_TYPES)
        target_gf = _or_zero("auto_beta_target_gf", auto_beta_target_gf)
        if bool(auto_beta) and target_gf >= 0.5:
            raise ValueError(
                f"auto_beta_target_gf must be < 0.5 with auto_beta (the target mean sigmoid(-logit)), got {target_gf}"
            )
        self.auto_beta = bool(auto_beta) and target_gf > 0.0
        if self.auto_beta:
            v.check_unit_interval("auto_beta_decay", auto_beta_decay)
            v.check_positive_finite("auto_beta_eps", auto_beta_eps)
            for name, value in (("auto_beta_min", auto_beta_min), ("auto_beta_max", auto_beta_max)):
                if value is not None:
                    v.check_positive_finite(name, value)
            if auto_beta_min is not None and auto_beta_max is not None and auto_beta_min > auto_beta_max:
                raise ValueError(f"auto_beta_min ({auto_beta_min}) must be <= auto_beta_max ({auto_beta_max})")
            eps = float(auto_beta_eps)
            target = min(max(target_gf, eps), 1.0 - eps)
            # as upstream computes it: -2 times the float32 logit of the target, read once to a Python float
            self._numerator = -2.0 * float(torch.logit(torch.tensor(target)))  # host-ok: a CPU scalar, at construction
            self._decay, self._eps = float(auto_beta_decay), eps
            self._beta_min = None if auto_beta_min is None else float(auto_beta_min)
            self._beta_max = None if auto_beta_max is None else float(auto_beta_max)
        else:
            v.check_positive_finite("beta", beta)
        v.check_finite("loss_weight", loss_weight)
        if margin_reduce is not None and not callable(margin_reduce):
            raise TypeError(
                f"margin_reduce must be a callable (0-dim tensor -> its mean over processes) or None, "
                f"got {type(margin_reduce).__name__}"
            )
        self.beta = float(beta) if not self.auto_beta else beta
        self.loss_weight = float(loss_weight)
        self.sft_loss_weight = _or_zero("sft_loss_weight", sft_loss_weight)
        self.anchor_alpha = _or_zero("anchor_alpha", anchor_alpha)
        self.norm_type = norm_type
        self.margin_reduce = margin_reduce
        self.margin_ema = None

    def __call__(
        self, policy_win, policy_lose, ref_win, ref_lose, win_target, lose_target, *, mask=None, original_loss=None
    ):
        """One micro-batch: the distiller's tensors, each [B, ...] (rank >= 2, the same shape;
        float16/bfloat16/float32/float64 mixed freely, upcast as upstream's `.float()`):
        policy_win (the trainer's prediction on the preferred latents), policy_lose,
        ref_win, ref_lose (adapter disabled, no gradient), win_target, lose_target (`noise -
        latents` of each side, the pair's shared noise). mask: the distiller's loss mask
        (`_mask_for_loss`), [B, ...] of the predictions' rank, each dim 1 or the predictions',
        values in [0, 1] (a negative entry makes the loss NaN); None: no mask. original_loss:
        the trainer's loss (0-dim), used only with sft_loss_weight != 0.

        Returns (loss 0-dim float32/float64 with gradient into policy_win and policy_lose,
        logs): detached 0-dim tensors under upstream's keys, `flow_dpo_loss`, `flow_dpo_beta`
        (the β used, SimpleTuner's units), `flow_dpo_margin`, `flow_dpo_win_adv`,
        `flow_dpo_lose_adv`, `flow_dpo_policy_win_err`, `flow_dpo_policy_lose_err`,
        `flow_dpo_ref_win_err`, `flow_dpo_ref_lose_err` (means over the pairs, in the reduction's
        units), `flow_dpo_negative_margin_pct` (percent), `flow_dpo_gradient_factor`
        (mean σ(-logit)), `total` (the loss) and, when anchor_alpha != 0, `flow_dpo_anchor_loss`.
        Upstream turns each into a Python float; do that where the trainer logs."""
        tensors = {
            "policy_win": policy_win,
            "policy_lose": policy_lose,
            "ref_win": ref_win,
            "ref_lose": ref_lose,
            "win_target": win_target,
            "lose_target": lose_target,
        }
        self._check_inputs(tensors, mask, original_loss)
        B, N = policy_win.shape[0], policy_win[0].numel()
        dtype = v.compute_dtype(*tensors.values())
        pred = torch.cat([policy_win, policy_lose])
        ref = torch.cat([ref_win, ref_lose]).detach()
        target = torch.cat([win_target, lose_target]).detach()
        unit = float(N) if self.norm_type == "sum" else 1.0  # SimpleTuner's row error = unit * mean_row(w * e²)

        weight = None  # per element w = mask (x N / the row's mask sum for masked_mean), both rows of a pair
        if mask is not None:
            weight = mask.detach().to(dtype)
            if self.norm_type == "masked_mean":
                dims = tuple(range(1, policy_win.dim()))
                count = weight.expand(policy_win.shape).sum(dim=dims).clamp_min(1.0)
                weight = weight * (N / count).view((B,) + (1,) * (policy_win.dim() - 1))
            weight = torch.cat([weight, weight])

        # The kernel sees sqrt(w) x (and sqrt(β) x with the automatic β): its per-row means are
        # then mean_row(w e²) (times β), so its inside_term is upstream's logit 0.5 β margin.
        kernel_inputs = (pred, ref, target)
        if weight is not None:
            root = weight.sqrt()
            kernel_inputs = tuple(x.to(dtype) * root for x in kernel_inputs)
        if self.auto_beta:
            beta = self._auto_beta(*kernel_inputs, unit)
            root = beta.to(dtype).sqrt()
            kernel_inputs = tuple(x.to(dtype) * root for x in kernel_inputs)
            dpo_loss, m = diffusion_dpo_loss(*kernel_inputs, beta=unit)
            to_units, margin_factor = unit / beta.to(dtype), 2.0 / beta.to(dtype)
        else:
            dpo_loss, m = diffusion_dpo_loss(*kernel_inputs, beta=self.beta * unit)
            beta = dpo_loss.new_full((), self.beta, dtype=torch.float32)
            to_units, margin_factor = unit, 2.0 / self.beta
        inside = m["inside_term"]
        errs = {k: m[k] * to_units for k in ("model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l")}
        loss = dpo_loss * self.loss_weight
        anchor = None
        if self.anchor_alpha != 0.0:
            anchor = sft_loss(pred, ref)[0] * self.anchor_alpha
            loss = loss + anchor
        if self.sft_loss_weight != 0.0:
            loss = loss + original_loss * self.sft_loss_weight
        logs = {
            "flow_dpo_loss": m["loss"],
            "flow_dpo_beta": beta,
            "flow_dpo_margin": inside.mean() * margin_factor,
            "flow_dpo_win_adv": errs["ref_mse_w"] - errs["model_mse_w"],
            "flow_dpo_lose_adv": errs["model_mse_l"] - errs["ref_mse_l"],
            "flow_dpo_policy_win_err": errs["model_mse_w"],
            "flow_dpo_policy_lose_err": errs["model_mse_l"],
            "flow_dpo_ref_win_err": errs["ref_mse_w"],
            "flow_dpo_ref_lose_err": errs["ref_mse_l"],
            "flow_dpo_negative_margin_pct": (inside < 0).to(dtype).mean() * 100.0,
            "flow_dpo_gradient_factor": torch.sigmoid(-inside).mean(),
            "total": loss.detach(),
        }
        if anchor is not None:
            logs["flow_dpo_anchor_loss"] = anchor.detach()
        return loss, logs

    def _auto_beta(self, pred, ref, target, unit):
        """β from the running mean of mean_i |margin_i| (SimpleTuner's `_beta_for_margin`), on
        the device: a float32 0-dim tensor (detached). Updates `margin_ema`. The margins come
        from a forward-only fused pass (its cancellation-free inside_term at β = 2 is the
        margin in mean units), not from differences of separately rounded errors."""
        with torch.no_grad():
            margin = diffusion_dpo_loss(pred.detach(), ref, target, beta=2.0)[1]["inside_term"] * unit
        value = margin.abs().mean()
        if self.margin_reduce is not None:
            value = self.margin_reduce(value)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(
                    f"margin_reduce must return a one-element tensor (the mean over processes), got "
                    f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                )
            value = value.reshape(())
        value = value.detach().to(torch.float64)
        if self.margin_ema is None:
            self.margin_ema = value
        else:
            self.margin_ema = self._decay * self.margin_ema + (1.0 - self._decay) * value
        beta = self._numerator / self.margin_ema.clamp(min=self._eps)
        if self._beta_min is not None:
            beta = beta.clamp(min=self._beta_min)
        if self._beta_max is not None:
            beta = beta.clamp(max=self._beta_max)
        return beta.to(torch.float32)

    def _check_inputs(self, tensors, mask, original_loss):
        first = tensors["policy_win"]
        v.check_prediction("policy_win", first)
        v.check_device("policy_win", first)
        for name, x in tensors.items():
            if name != "policy_win":
                v.check_like(name, x, "policy_win", first)
            if name.startswith("ref") or name.endswith("target"):
                v.check_constant(name, x)
        if mask is not None:
            shape = tuple(first.shape)
            v.check_aux_tensor(
                "mask",
                mask,
                first.device,
                f"[{shape[0]}, ...] of rank {len(shape)}, each dim 1 or that of policy_win {shape}",
                lambda s: (
                    len(s) == len(shape)
                    and s[0] == shape[0]
                    and all(a in (1, b) for a, b in zip(s[1:], shape[1:], strict=True))
                ),
            )
            v.check_float_tensor("mask", mask)
        if original_loss is not None or self.sft_loss_weight != 0.0:
            if original_loss is None:
                raise ValueError(
                    f"original_loss (the trainer's own loss, a 0-dim tensor) is required with sft_loss_weight="
                    f"{self.sft_loss_weight}, got None"
                )
            v.check_aux_tensor("original_loss", original_loss, first.device, "[] (0-dim)", lambda s: s == ())
            v.check_float_tensor("original_loss", original_loss)


def _or_zero(name, value):
    """Upstream's `float(config.get(key, 0.0) or 0.0)`: None reads as 0; finite."""
    value = 0.0 if value is None else value
    v.check_finite(name, value)
    return float(value)
