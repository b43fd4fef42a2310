"""Non-finite inputs (README, API: one rule for every loss): a NaN, +inf or -inf anywhere in
model_pred, ref_pred or target makes the loss NaN, every metric that depends on that pair's
(KTO, SFT: that row's) predictions NaN (accuracies included, never a plausible fraction), and
the pair's entries of the per-pair vectors NaN, while the other pairs' entries stay exactly
what they are without the bad element. Outputs are poisoned (conftest), so a NaN that the
kernel did not compute cannot pass for one."""

import math

import pytest
import torch
from helpers import make_inputs
from loss_calls import CALLS, call

import fastpref

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 * inf, on purpose
KINDS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
SHAPE = (6, 3, 5, 5)  # B = 3 pairs (KTO/SFT: 6 rows)
UNPAIRED = ("kto", "kto_baseline", "sft")
# Metrics that do not depend on the predictions (embedding weights, timestep weights, a given
# KTO baseline, λ = 1 without the safeguard): they stay as they are.
CONSTANT_METRICS = {"weights", "diag_weight_mean", "step_weight_mean"}
CONSTANT_BY_CALL = {"kto_baseline": {"kl"}, "sdpo_off": {"loser_grad_scale"}}
# Calls whose pairs (rows) are independent: the other rows' gradients are unchanged too. The
# rest couple every pair through one batch quantity (RPO's all-pairs logits, KTO's own
# baseline z, SDPO's safeguard λ), so a bad pair makes their gradients NaN as well.
COUPLED = {"rpo_uniform", "rpo", "rpo_diagonal", "kto", "sdpo", "sdpo_dspo_sd15", "sdpo_dspo_sdxl", "sdpo_dmpo"}
INPUTS = ("model_pred", "ref_pred", "target")


def cases():
    for name in sorted(CALLS):
        for i, where in enumerate(INPUTS):
            if where == "ref_pred" and not CALLS[name][1]:
                continue
            for j, kind in enumerate(KINDS):
                # Winner rows and loser rows (first and second half) both get each input's bad values.
                loser = (i + j) % 2 == 1 and name != "sft_winners"
                yield name, where, kind, loser


CASES = list(cases())


_CLEAN = {}


def _clean_run(name, device):
    """The call on the clean inputs (seed 0), made once per call name and device: every case of
    a call compares with the same clean run."""
    key = (name, str(device))
    if key not in _CLEAN:
        _CLEAN[key] = _forward_backward(name, *make_inputs(SHAPE, torch.float32, device, 0))
    return _CLEAN[key]


def _forward_backward(name, model, ref, target):
    leaf = model.detach().clone().requires_grad_(True)
    loss, metrics = call(name, leaf, ref, target)
    loss.backward(torch.tensor(0.75, dtype=loss.dtype, device=loss.device))
    return loss.detach(), metrics, leaf.grad


@pytest.mark.parametrize(
    "name,where,kind,loser", CASES, ids=[f"{n}-{w}-{k}-{'loser' if lo else 'winner'}" for n, w, k, lo in CASES]
)
def test_a_non_finite_element_poisons_its_pair(name, where, kind, loser, device):
    inputs = list(make_inputs(SHAPE, torch.float32, device, 0))
    _, clean, clean_grad = _clean_run(name, device)
    B = SHAPE[0] // 2
    row = B + 1 if loser else 1
    pair = row if name in UNPAIRED else row % B
    bad = [x.clone() for x in inputs]
    bad[INPUTS.index(where)][row, 1, 2, 3] = KINDS[kind]
    loss, metrics, grad = _forward_backward(name, *bad)

    assert torch.isnan(loss), f"loss {float(loss)} with {kind} in {where} row {row}"
    constant = CONSTANT_METRICS | CONSTANT_BY_CALL.get(name, set())
    assert set(metrics) == set(clean)
    for key, value in metrics.items():
        if not value.dtype.is_floating_point:  # integer metrics (the DSPO branch) stay integers
            continue
        if key in constant:
            assert torch.equal(value, clean[key]), f"{key} does not depend on the predictions: {value}"
        elif value.dim() == 0:
            assert torch.isnan(value), f"metric {key} = {float(value)} with {kind} in {where} row {row}"
        else:  # per-pair vectors: inside_term, criterion
            others = torch.arange(value.shape[0], device=value.device) != pair
            assert torch.isnan(value[pair]), f"{key}[{pair}] = {float(value[pair])}"
            assert torch.isfinite(value[others]).all() and torch.equal(value[others], clean[key][others]), (
                f"{key}: the other pairs changed: {value} vs {clean[key]}"
            )
    if name not in COUPLED:
        rows = [pair] if name in UNPAIRED else [pair, pair + B]
        keep = torch.ones(SHAPE[0], dtype=torch.bool, device=grad.device)
        keep[rows] = False
        assert torch.equal(grad[keep], clean_grad[keep]), "the other rows' gradients changed"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sft_winners_only_ignores_a_loser_row(kind, device):
    """winners_only=True never reads the loser rows' errors: a non-finite loser leaves the loss."""
    model, _, target = make_inputs(SHAPE, torch.float32, device, 0)
    clean, _ = fastpref.sft_loss(model, target, winners_only=True)
    model = model.clone()
    model[4, 0, 0, 0] = KINDS[kind]
    loss, _ = fastpref.sft_loss(model, target, winners_only=True)
    assert torch.equal(loss, clean)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_the_rule_holds_in_every_dtype(dtype, device):
    """Half-precision inputs upcast their inf/NaN; fp64 accumulates in fp64."""
    model, ref, target = make_inputs(SHAPE, dtype, device, 2)
    target = target.clone()
    target[4, 0, 1, 1] = math.inf
    loss, m = fastpref.diffusion_dpo_loss(model, ref, target)
    assert torch.isnan(loss) and torch.isnan(m["implicit_acc"]) and torch.isnan(m["inside_term"][1])
    assert torch.isfinite(m["inside_term"][[0, 2]]).all()


def test_kto_baseline_of_a_non_finite_batch_is_nan(device):
    """kto_baseline is NaN (not +inf, not clamped to 0 from -inf) when a row is non-finite, so
    every process that receives it gets a NaN loss rather than a saturated, plausible one."""
    inputs = make_inputs(SHAPE, torch.float32, device, 3)
    for index, where in enumerate(INPUTS):
        for kind, value in KINDS.items():
            model, ref, target = (x.clone() for x in inputs)
            (model, ref, target)[index][2, 0, 0, 0] = value
            z = fastpref.kto_baseline(model, target, ref_pred=ref)
            assert torch.isnan(z), f"baseline {float(z)} with {kind} in {where}"
