"""fastpref.compat's flow-matching drop-ins against eager re-implementations of the upstream
blocks (docs/methods.md §5, §7): loss, gradient and every log key, float64 / float32 / bfloat16
inputs, 4-D and 5-D latents, and bad input.

Upstream revisions read (the eager functions below are this project's own code following each
block's operation sequence, not copies):
- yifan123/flow_grpo `scripts/train_sd3_dpo.py` at ac4c86e8cae0 (lines 924-950: `target =
  noise - model_input` to the `implicit_acc` append).
- bghira/SimpleTuner `simpletuner/helpers/distillation/flow_dpo/distiller.py` at bc8e6ab7738c
  (last changed in 289c17a4b26e): `compute_distill_loss` (lines 61-138), `_per_sample_error`
  (237-262) and `_beta_for_margin` (264-293).

The eager blocks evaluate in float32 as upstream's `.float()` does, or in float64 for float64
inputs (the float64 reference). Agreement: float32 rounding amplified by β (docs/methods.md §4),
with fastpref's β = SimpleTuner's β · N for the sum reduction."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import OUT_RTOL, FailOnHostSync, assert_close, assert_grad_close, compute_rtol, make_inputs

from fastpref import compat, diffusion_dpo_loss

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
GRPO_KEYS = {
    "loss",
    "model_w_err",
    "model_l_err",
    "ref_w_err",
    "ref_l_err",
    "w_diff",
    "l_diff",
    "w_l_diff",
    "inside_term",
    "implicit_acc",
}
ST_KEYS = {
    "flow_dpo_loss",
    "flow_dpo_beta",
    "flow_dpo_margin",
    "flow_dpo_win_adv",
    "flow_dpo_lose_adv",
    "flow_dpo_policy_win_err",
    "flow_dpo_policy_lose_err",
    "flow_dpo_ref_win_err",
    "flow_dpo_ref_lose_err",
    "flow_dpo_negative_margin_pct",
    "flow_dpo_gradient_factor",
    "total",
}
ST_DEFAULTS = dict(
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
)


def _compute(*tensors):
    return F64 if any(t.dtype == F64 for t in tensors) else F32


# --- flow_grpo ----------------------------------------------------------------------------


def eager_flow_grpo(model_pred, model_pred_ref, target, beta):
    """train_sd3_dpo.py's loss lines: float upcast squared errors, whole-row means, chosen rows
    first, inside = -0.5 β (w_diff - l_diff), loss the mean -logsigmoid, info means."""
    c = _compute(model_pred, model_pred_ref, target)
    n, bsz = target.shape[0], target.shape[0] // 2
    theta = ((model_pred.to(c) - target.to(c)) ** 2).reshape(n, -1).mean(dim=1)
    ref = ((model_pred_ref.to(c) - target.to(c)) ** 2).reshape(n, -1).mean(dim=1)
    w_diff, l_diff = theta[:bsz] - ref[:bsz], theta[bsz:] - ref[bsz:]
    inside = -0.5 * beta * (w_diff - l_diff)
    loss = -F.logsigmoid(inside).mean()
    logs = {
        "loss": loss.detach(),
        "model_w_err": theta[:bsz].mean().detach(),
        "model_l_err": theta[bsz:].mean().detach(),
        "ref_w_err": ref[:bsz].mean(),
        "ref_l_err": ref[bsz:].mean(),
        "w_diff": w_diff.mean().detach(),
        "l_diff": l_diff.mean().detach(),
        "w_l_diff": (w_diff - l_diff).mean().detach(),
        "inside_term": inside.mean().detach(),
        "implicit_acc": (inside > 0).sum().to(c) / inside.shape[0],
    }
    return loss, logs, inside.detach(), float((theta + ref).detach().max())


def grad_of(fn, leaves, *others, **kw):
    """fn(leaf copies..., *others, **kw), backward with incoming gradient 0.75: (outputs, grads)."""
    copies = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*copies, *others, **kw)
    out[0].backward(torch.tensor(0.75, dtype=out[0].dtype))
    return out, [x.grad for x in copies]


GRPO_CASES = [
    ((4, 16, 8, 8), F32, 100.0, 0.3),
    ((4, 16, 8, 8), F64, 100.0, 0.3),
    ((6, 16, 8, 8), (BF16, BF16, F32), 100.0, 0.3),
    ((4, 4, 3, 8, 8), F32, 2000.0, 0.05),
    ((2, 16, 8, 8), F32, 5000.0, 0.02),
]


@pytest.mark.parametrize(
    "shape,dtypes,beta,scale",
    GRPO_CASES,
    ids=[f"{'x'.join(map(str, s))}-{d if isinstance(d, torch.dtype) else 'mixed'}-{b:g}" for s, d, b, _ in GRPO_CASES],
)
def test_flow_grpo_block(shape, dtypes, beta, scale):
    inputs = make_inputs(shape, dtypes, "cpu", 31, scale)
    (loss, logs), (grad,) = grad_of(compat.flow_grpo_dpo_loss, inputs[:1], *inputs[1:], beta=beta)
    (eloss, elogs, inside, mr), (egrad,) = grad_of(eager_flow_grpo, inputs[:1], *inputs[1:], beta)
    rtol = 2 * compute_rtol(inputs, beta)
    out_dtype = inputs[0].dtype
    assert set(logs) == GRPO_KEYS == set(elogs)
    assert loss.dtype == _compute(*inputs) and grad.dtype == out_dtype
    assert_close("loss", loss, eloss, rtol, atol=rtol)
    assert_grad_close(grad, egrad.double(), out_dtype, rtol + OUT_RTOL[egrad.dtype])
    base = 1e-12 if _compute(*inputs) == F64 else 1e-5
    for key, value in logs.items():
        assert not value.requires_grad and value.shape == (), key
        if key == "implicit_acc":
            ambiguous = int((inside.abs() <= rtol).sum())
            assert abs(float(value) - float(elogs[key])) <= ambiguous / inside.numel() + 1e-6
        elif key == "loss":
            assert_close(key, value, eloss, rtol, atol=rtol)
        elif key in ("inside_term", "w_l_diff"):  # in inside units: rtol of §4
            unit = 1.0 if key == "inside_term" else 0.5 * beta
            assert_close(key, value * unit, elogs[key] * unit, 0.0, atol=rtol)
        elif key in ("w_diff", "l_diff"):  # differences of errors: rounding of m and r
            assert_close(key, value, elogs[key], 0.0, atol=base * mr)
        else:
            assert_close(key, value, elogs[key], base)
    assert float(loss.detach()) > 0 and float(grad.abs().max()) > 0


def test_flow_grpo_beta_is_fastprefs_beta():
    """flow_grpo's β is the official convention: the same numbers as diffusion_dpo_loss(beta)."""
    inputs = make_inputs((4, 16, 8, 8), F32, "cpu", 32, 0.3)
    loss, logs = compat.flow_grpo_dpo_loss(*inputs, beta=100.0)
    ref, m = diffusion_dpo_loss(*inputs, beta=100.0)
    assert float(loss) == float(ref) and float(logs["implicit_acc"]) == float(m["implicit_acc"])


# --- SimpleTuner --------------------------------------------------------------------------


class EagerSimpleTuner:
    """FlowDPODistiller's loss block re-implemented: errors of the upcast elements (times the
    mask), reduced by sum / mean / masked_mean, β fixed or automatic (upstream's running mean
    of |margin| on the host, float64, β rounded to float32), logits 0.5 β margin, the anchor
    and the SFT term, upstream's log keys (as tensors)."""

    def __init__(self, reduce=None, **config):
        self.config = {**ST_DEFAULTS, **config}
        self.reduce = reduce
        self.margin_ema = None

    def error(self, pred, target, mask, c):
        err = (pred.to(c) - target.to(c)).pow(2)
        if mask is not None:
            err = err * mask.to(c)
        dims = tuple(range(1, err.dim()))
        norm = self.config["norm_type"]
        if norm == "sum":
            return err.sum(dim=dims)
        if norm == "mean" or mask is None:
            return err.mean(dim=dims)
        return err.sum(dim=dims) / mask.to(c).expand_as(err).sum(dim=dims).clamp_min(1.0)

    def beta(self, margin):
        cfg = self.config
        gf = float(cfg["auto_beta_target_gf"] or 0.0)
        if not cfg["auto_beta"] or gf <= 0.0:
            return torch.tensor(float(cfg["beta"]), dtype=F32)
        value = margin.detach().abs().mean()
        if self.reduce is not None:
            value = self.reduce(value)
        value = float(value)
        d = cfg["auto_beta_decay"]
        self.margin_ema = value if self.margin_ema is None else d * self.margin_ema + (1 - d) * value
        eps = cfg["auto_beta_eps"]
        target = min(max(gf, eps), 1.0 - eps)
        beta = -2.0 * float(torch.logit(torch.tensor(target))) / max(self.margin_ema, eps)
        if cfg["auto_beta_min"] is not None:
            beta = max(cfg["auto_beta_min"], beta)
        if cfg["auto_beta_max"] is not None:
            beta = min(cfg["auto_beta_max"], beta)
        return torch.tensor(beta, dtype=F32)

    def __call__(self, pw, pl, rw, rl, tw, tl, mask=None, original_loss=None):
        c = _compute(pw, pl, rw, rl, tw, tl)
        m_w, m_l = self.error(pw, tw, mask, c), self.error(pl, tl, mask, c)
        r_w, r_l = self.error(rw, tw, mask, c), self.error(rl, tl, mask, c)
        win_adv, lose_adv = r_w - m_w, m_l - r_l
        margin = win_adv + lose_adv
        beta = self.beta(margin)
        logits = 0.5 * beta.to(c) * margin
        dpo = -F.logsigmoid(logits).mean()
        loss = dpo * self.config["loss_weight"]
        logs = {}
        if self.config["anchor_alpha"]:
            anchor = (
                0.5 * (F.mse_loss(pw.to(c), rw.to(c)) + F.mse_loss(pl.to(c), rl.to(c))) * self.config["anchor_alpha"]
            )
            loss = loss + anchor
            logs["flow_dpo_anchor_loss"] = anchor.detach()
        if self.config["sft_loss_weight"]:
            loss = loss + original_loss * self.config["sft_loss_weight"]
        logs.update(
            flow_dpo_loss=dpo.detach(),
            flow_dpo_beta=beta,
            flow_dpo_margin=margin.detach().mean(),
            flow_dpo_win_adv=win_adv.detach().mean(),
            flow_dpo_lose_adv=lose_adv.detach().mean(),
            flow_dpo_policy_win_err=m_w.detach().mean(),
            flow_dpo_policy_lose_err=m_l.detach().mean(),
            flow_dpo_ref_win_err=r_w.mean(),
            flow_dpo_ref_lose_err=r_l.mean(),
            flow_dpo_negative_margin_pct=(margin.detach() < 0).to(c).mean() * 100.0,
            flow_dpo_gradient_factor=torch.sigmoid(-logits.detach()).mean(),
            total=loss.detach(),
        )
        return loss, logs, logits.detach(), float((m_w + m_l + r_w + r_l).detach().abs().max())


def st_inputs(shape, dtypes, seed, scale):
    """(policy_win, policy_lose, ref_win, ref_lose, win_target, lose_target), each [B, ...]."""
    p, r, t = make_inputs(shape, dtypes, "cpu", seed, scale)
    return (*p.chunk(2), *r.chunk(2), *t.chunk(2))


def st_compare(ours, theirs, tensors, fastpref_beta, beta_rtol=0.0):
    """Loss, both gradients and every log key. Tolerances: §4's rtol with fastpref's β (the
    masked errors are at most the unmasked ones); beta_rtol: the automatic β's, from the
    float32 rounding of mean |margin| (fastpref forms it from its own row errors)."""
    (loss, logs), grads = ours
    (eloss, elogs, logits, err_scale), egrads = theirs
    p = torch.cat(tensors[:2])
    r, t = torch.cat(tensors[2:4]), torch.cat(tensors[4:])
    rtol = 2 * compute_rtol((p, r, t), fastpref_beta)
    assert set(logs) == set(elogs), sorted(set(logs) ^ set(elogs))
    assert_close("loss", loss, eloss, rtol, atol=rtol)
    for g, e in zip(grads, egrads, strict=True):
        assert_grad_close(g, e.double(), tensors[0].dtype, rtol + OUT_RTOL[e.dtype])
    assert float(elogs["flow_dpo_beta"]) > 0
    base = 1e-12 if _compute(*tensors) == F64 else 1e-5
    for key, value in logs.items():
        assert not value.requires_grad and value.shape == (), key
        if key == "flow_dpo_negative_margin_pct":
            ambiguous = int((logits.abs() <= rtol).sum())
            assert abs(float(value) - float(elogs[key])) <= 100.0 * ambiguous / logits.numel() + 1e-4
        elif key == "flow_dpo_margin":  # in logit units
            half_beta = 0.5 * float(elogs["flow_dpo_beta"])
            assert_close(key, value * half_beta, elogs[key] * half_beta, 0.0, atol=rtol)
        elif key in ("flow_dpo_gradient_factor", "flow_dpo_loss", "total"):
            assert_close(key, value, elogs[key], rtol, atol=rtol)
        elif key in ("flow_dpo_win_adv", "flow_dpo_lose_adv"):  # differences of errors
            assert_close(key, value, elogs[key], 0.0, atol=base * err_scale)
        elif key == "flow_dpo_beta":
            assert_close(key, value, elogs[key], beta_rtol)
        else:
            assert_close(key, value, elogs[key], base)


def run_st(fn, tensors, **kw):
    return grad_of(fn, tensors[:2], *tensors[2:], **kw)


ST_CASES = [
    # id, shape, dtypes, config, scale
    ("sum-b1", (4, 16, 8, 8), F32, dict(auto_beta=False), 0.005),
    ("sum-b1-f64", (4, 16, 8, 8), F64, dict(auto_beta=False), 0.005),
    ("sum-b1-bf16", (4, 16, 8, 8), (BF16, BF16, F32), dict(auto_beta=False), 0.005),
    ("sum-b2-video", (4, 4, 3, 8, 8), F32, dict(auto_beta=False, beta=2.0), 0.05),
    ("mean-b2000", (4, 16, 8, 8), F32, dict(auto_beta=False, norm_type="mean", beta=2000.0), 0.02),
    ("mean-b2000-mixed", (6, 16, 8, 8), (BF16, F16, F32), dict(auto_beta=False, norm_type="MEAN", beta=2000.0), 0.02),
    ("gf0-means-fixed", (4, 16, 8, 8), F32, dict(auto_beta_target_gf=None, beta=0.5), 0.005),
    ("weights", (4, 16, 8, 8), F32, dict(auto_beta=False, loss_weight=0.7, anchor_alpha=0.5), 0.005),
]


@pytest.mark.parametrize("case", ST_CASES, ids=[c[0] for c in ST_CASES])
def test_simpletuner_block_fixed_beta(case):
    _, shape, dtypes, config, scale = case
    tensors = st_inputs(shape, dtypes, 41, scale)
    ours = run_st(compat.SimpleTunerFlowDPO(**config), tensors)
    theirs = run_st(EagerSimpleTuner(**config), tensors)
    n = tensors[0][0].numel()
    beta = theirs[0][1]["flow_dpo_beta"]
    fastpref_beta = float(beta) * (n if config.get("norm_type", "sum").lower() == "sum" else 1)
    st_compare(ours, theirs, tensors, fastpref_beta)
    assert set(ours[0][1]) == ST_KEYS | ({"flow_dpo_anchor_loss"} if config.get("anchor_alpha") else set())
    assert 0.05 < float(theirs[0][2].abs().max()) < 20, "the construction must make the logits O(1)"


@pytest.mark.parametrize("norm_type", ["sum", "mean", "masked_mean"])
@pytest.mark.parametrize(
    "shape,mask_shape",
    [((4, 16, 8, 8), (2, 1, 8, 8)), ((4, 4, 3, 8, 8), (2, 1, 1, 8, 8)), ((2, 16, 8, 8), (1, 16, 8, 8))],
    ids=["4d", "5d-frames-shared", "B1-full-mask"],
)
def test_simpletuner_block_with_mask(norm_type, shape, mask_shape):
    """The distiller's loss mask (values in [0, 1], some exactly 0 and 1; broadcast over channels
    and frames); masked_mean divides each row by its mask sum."""
    tensors = st_inputs(shape, F32, 42, 0.01 if norm_type == "sum" else 0.05)
    g = torch.Generator().manual_seed(43)
    mask = (torch.rand(mask_shape, generator=g, dtype=F64) * 1.6 - 0.3).clamp(0, 1).to(F32)
    assert bool((mask == 0).any()) and bool((mask == 1).any())
    config = dict(auto_beta=False, norm_type=norm_type, beta=1.0 if norm_type == "sum" else 2000.0)
    ours = run_st(compat.SimpleTunerFlowDPO(**config), tensors, mask=mask)
    theirs = run_st(EagerSimpleTuner(**config), tensors, mask=mask)
    n = tensors[0][0].numel()
    st_compare(ours, theirs, tensors, config["beta"] * (n if norm_type == "sum" else 1.0))
    unmasked = run_st(EagerSimpleTuner(**config), tensors)
    assert abs(float(unmasked[0][0].detach()) - float(theirs[0][0].detach())) > 1e-4, "the mask must change the loss"


def test_simpletuner_masked_mean_without_mask_is_mean():
    tensors = st_inputs((4, 16, 8, 8), F32, 44, 0.05)
    (a, la), _ = run_st(compat.SimpleTunerFlowDPO(auto_beta=False, norm_type="masked_mean", beta=2000.0), tensors)
    (b, lb), _ = run_st(compat.SimpleTunerFlowDPO(auto_beta=False, norm_type="mean", beta=2000.0), tensors)
    assert float(a.detach()) == float(b.detach()) and float(la["flow_dpo_margin"]) == float(lb["flow_dpo_margin"])


AUTO_CASES = [
    # id, config, scales of two consecutive steps, dtypes, mask, what the β must do
    ("defaults-clamped-at-max", dict(), (0.005, 0.01), F32, False, "max"),
    ("defaults-adapting", dict(), (0.3, 0.6), F32, False, "free"),
    ("f64-adapting", dict(), (0.6, 0.3), F64, False, "free"),
    ("bf16-mask-anchor-sft", dict(anchor_alpha=0.5, sft_loss_weight=0.1), (0.6, 0.9), BF16, True, "free"),
    ("mean-no-max", dict(norm_type="mean", auto_beta_max=None), (0.05, 0.1), F32, False, "free"),
    ("clamped-at-min", dict(auto_beta_min=0.5, auto_beta_max=None), (0.6, 0.8), F32, False, "min"),
]


@pytest.mark.parametrize("case", AUTO_CASES, ids=[c[0] for c in AUTO_CASES])
def test_simpletuner_auto_beta_over_steps(case):
    """SimpleTuner's default automatic β: two consecutive steps, so the running mean of
    |margin| (decay 0.99, first value the first step's) is exercised, with a cross-process
    reduce that mixes in another process's value; the running mean stays a device tensor."""
    _, config, scales, dtype, masked, regime = case
    other = torch.tensor(3.0, dtype=F64 if dtype == F64 else F32)
    reduce = lambda t: 0.5 * (t + other.to(t.dtype))  # noqa: E731  (a second process's mean |margin|)
    ours_fn = compat.SimpleTunerFlowDPO(**config, margin_reduce=reduce)
    eager = EagerSimpleTuner(reduce=reduce, **config)
    g = torch.Generator().manual_seed(45)
    for step, scale in enumerate(scales):
        tensors = st_inputs((4, 4, 8, 8), dtype, 46 + step, scale)
        kw = {}
        if masked:
            kw["mask"] = torch.rand((2, 1, 8, 8), generator=g).to(dtype)
        if config.get("sft_loss_weight"):
            kw["original_loss"] = torch.tensor(0.37, dtype=F32)
        ours = run_st(ours_fn, tensors, **kw)
        theirs = run_st(eager, tensors, **kw)
        beta = float(theirs[0][1]["flow_dpo_beta"])
        unit = tensors[0][0].numel() if config.get("norm_type", "sum") == "sum" else 1.0
        st_compare(ours, theirs, tensors, beta * unit, beta_rtol=2e-6)
        assert isinstance(ours_fn.margin_ema, torch.Tensor) and ours_fn.margin_ema.dtype == F64
        # mean |margin| from float32 per-row errors on both sides: their rounding, ~1e-7 of the errors
        err_scale = theirs[0][3]
        assert_close("margin_ema", ours_fn.margin_ema, torch.tensor(eager.margin_ema), 1e-6, atol=1e-7 * err_scale)
        bound = {"max": config.get("auto_beta_max", 1.0), "min": config.get("auto_beta_min", 1e-3)}.get(regime)
        if regime == "free":
            assert 1e-3 < beta < 1.0 or config.get("auto_beta_max", 1.0) is None, beta
        else:
            assert beta == pytest.approx(bound, rel=1e-7), (regime, beta)


def test_simpletuner_sum_is_fastpref_beta_times_n_at_sd3_512():
    """The worked example of docs/methods.md §7: SimpleTuner's default sum reduction at SD3
    512 px (latents 16x64x64, N = 65,536) with β = 1 is fastpref's β = 65,536."""
    tensors = st_inputs((2, 16, 64, 64), F32, 47, 0.002)
    p, r, t = (torch.cat(tensors[i : i + 2]) for i in (0, 2, 4))
    (loss, m), (grad,) = grad_of(diffusion_dpo_loss, [p], r, t, beta=65536.0)
    (eloss, elogs, logits, _), egrads = run_st(EagerSimpleTuner(auto_beta=False, beta=1.0), tensors)
    assert 0.1 < float(logits.abs().max()) < 10, "the construction must make the logits O(1)"
    rtol = 2 * compute_rtol((p, r, t), 65536.0)
    assert_close("loss", loss, eloss, rtol)
    assert_close("inside_term", m["inside_term"], logits, 0.0, atol=rtol)
    assert_grad_close(grad, torch.cat(egrads).double(), F32, rtol + OUT_RTOL[F32])


def test_drop_ins_make_no_host_sync():
    st = compat.SimpleTunerFlowDPO(anchor_alpha=0.5, sft_loss_weight=0.1, norm_type="masked_mean")
    tensors = st_inputs((4, 4, 4, 4), F32, 48, 0.3)
    mask = torch.rand((2, 1, 4, 4), generator=torch.Generator().manual_seed(49))
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors[:2]]
    original = (leaves[0].float() ** 2).mean()
    with FailOnHostSync():
        for _ in range(2):  # the first call starts the running mean, the second updates it
            loss, logs = st(*leaves, *tensors[2:], mask=mask, original_loss=original)
        loss.backward()
        p, r, t = make_inputs((4, 4, 4, 4), BF16, "cpu", 50, 0.3)
        leaf = p.detach().clone().requires_grad_(True)
        loss, _ = compat.flow_grpo_dpo_loss(leaf, r, t, beta=100.0)
        loss.backward()
    assert leaves[0].grad is not None and leaf.grad is not None


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(norm_type="l1"), ValueError, "norm_type"),
        (dict(auto_beta_target_gf=0.5), ValueError, "auto_beta_target_gf"),
        (dict(auto_beta_decay=1.5), ValueError, "auto_beta_decay"),
        (dict(auto_beta_min=2.0, auto_beta_max=1.0), ValueError, "auto_beta_min"),
        (dict(auto_beta_max=-1.0), ValueError, "auto_beta_max"),
        (dict(auto_beta=False, beta=0.0), ValueError, "beta"),
        (dict(auto_beta=False, beta=float("nan")), ValueError, "beta"),
        (dict(loss_weight=float("inf")), ValueError, "loss_weight"),
        (dict(anchor_alpha="x"), TypeError, "anchor_alpha"),
        (dict(margin_reduce=3), TypeError, "margin_reduce"),
    ],
)
def test_simpletuner_refuses_bad_settings(kw, exc, match):
    with pytest.raises(exc, match=match):
        compat.SimpleTunerFlowDPO(**kw)


def _bad_inputs():
    good = st_inputs((4, 16, 8, 8), F32, 51, 0.01)
    names = ["policy_win", "policy_lose", "ref_win", "ref_lose", "win_target", "lose_target"]

    def swap(i, x):
        return tuple(x if j == i else t for j, t in enumerate(good))

    shape_bad = torch.zeros(2, 16, 8, 4)
    cases = [(swap(i, shape_bad), {}, ValueError, names[i]) for i in (1, 3, 5)]
    cases += [(swap(2, good[2].clone().requires_grad_(True)), {}, ValueError, "ref_win")]
    cases += [(swap(4, good[4].clone().requires_grad_(True)), {}, ValueError, "win_target")]
    cases += [(swap(0, good[0].long()), {}, TypeError, "policy_win")]
    cases += [(swap(0, good[0][:, 0, 0, 0]), {}, ValueError, "policy_win")]
    cases += [(good, dict(mask=torch.rand(2, 1, 8, 4)), ValueError, "mask")]
    cases += [(good, dict(mask=torch.rand(2, 1, 8)), ValueError, "mask")]
    cases += [(good, dict(mask=torch.rand(4, 1, 8, 8)), ValueError, "mask")]
    cases += [(good, dict(mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)), TypeError, "mask")]
    cases += [(good, dict(original_loss=torch.ones(2)), ValueError, "original_loss")]
    return cases


@pytest.mark.parametrize("tensors,kw,exc,match", _bad_inputs(), ids=lambda x: None)
def test_simpletuner_refuses_bad_inputs_before_any_launch(tensors, kw, exc, match, no_launch):
    st = compat.SimpleTunerFlowDPO()
    with pytest.raises(exc, match=match):
        st(*tensors, **kw)
    assert st.margin_ema is None, "a refused call must not start the running mean"


def test_simpletuner_sft_term_needs_the_trainers_loss(no_launch):
    tensors = st_inputs((4, 16, 8, 8), F32, 52, 0.01)
    with pytest.raises(ValueError, match="original_loss"):
        compat.SimpleTunerFlowDPO(sft_loss_weight=0.5)(*tensors)


@pytest.mark.parametrize(
    "beta,exc,match",
    [
        (0.0, ValueError, "config/base.py"),
        (-1.0, ValueError, "beta"),
        (math.inf, ValueError, "beta"),
        ("1", TypeError, "beta"),
    ],
)
def test_flow_grpo_refuses_bad_beta(beta, exc, match, no_launch):
    inputs = make_inputs((4, 16, 8, 8), F32, "cpu", 53)
    with pytest.raises(exc, match=match):
        compat.flow_grpo_dpo_loss(*inputs, beta=beta)


def test_flow_grpo_refuses_bad_tensors(no_launch):
    p, r, t = make_inputs((3, 16, 8, 8), F32, "cpu", 54)
    with pytest.raises(ValueError, match="2B rows"):
        compat.flow_grpo_dpo_loss(p, r, t, beta=100.0)
    p, r, t = make_inputs((4, 16, 8, 8), F32, "cpu", 54)
    with pytest.raises(ValueError, match="model_pred_ref"):
        compat.flow_grpo_dpo_loss(p, r.requires_grad_(True), t, beta=100.0)


def test_benchmark_registry_times_both_upstream_blocks():
    """The GPU benchmark's dpo_sigmoid method is compared with both flow blocks as eager
    providers (tests/test_benchmarks_quick.py checks each against fastpref's loss)."""
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, bench)
    try:
        import providers
        import registry
    finally:
        sys.path.remove(bench)
    method = registry.METHODS["dpo_sigmoid"]
    assert {"eager-flow-grpo", "eager-simpletuner"} <= set(method.eager)
    ok, _ = providers.providers_for(method, providers.DEFAULT_PROVIDERS)
    assert {"eager-flow-grpo", "eager-simpletuner"} <= set(ok)
    p, r, t = make_inputs((4, 16, 8, 8), F32, "cpu", 55, 0.02)
    loss, logs = providers.build(method, "eager-simpletuner")(p, r, t)
    eager = EagerSimpleTuner(auto_beta=False, beta=5000.0 / p[0].numel())(*p.chunk(2), *r.chunk(2), *t.chunk(2))
    assert_close("loss", loss, eager[0], 1e-6)
    assert set(logs) | {"flow_dpo_loss", "total"} == ST_KEYS
