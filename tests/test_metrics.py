"""fastpref.row_errors (the fused per-row errors) against float64: every dtype mix, 2-D to 5-D,
rows split across programs, non-contiguous input; detached, no host sync, bad input rejected
before any launch. Outputs are poisoned (conftest)."""

import pytest
import torch
from helpers import FailOnHostSync, assert_close, case_id, make_inputs

import fastpref

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CASES = [
    ((6, 3, 25, 41), F32),
    ((6, 3, 25, 41), BF16),
    ((6, 3, 25, 41), F64),
    ((6, 3, 25, 41), (F32, F16, F16)),
    ((5, 7), (BF16, F32, F16)),
    ((4, 2, 3, 5, 7), (F16, BF16, F32)),
]


def reference_errors(x, target):
    return ((x.double().cpu() - target.double().cpu()) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("with_ref", [True, False], ids=["with_ref", "model_only"])
@pytest.mark.parametrize("shape,dtypes", CASES, ids=[case_id(s, d) for s, d in CASES])
def test_row_errors_match_float64(shape, dtypes, with_ref, device):
    model, ref, target = make_inputs(shape, dtypes, device, seed=7, scale=0.3)
    model_err, ref_err = fastpref.row_errors(model, target, ref_pred=ref if with_ref else None)
    wide = F64 in (model.dtype, ref.dtype if with_ref else F32, target.dtype)
    assert model_err.dtype == (F64 if wide else F32) and model_err.shape == (shape[0],)
    rtol = 1e-12 if wide else 2e-6
    assert_close("model_err", model_err, reference_errors(model, target), rtol)
    if with_ref:
        assert ref_err.dtype == model_err.dtype
        assert_close("ref_err", ref_err, reference_errors(ref, target), rtol)
    else:
        assert ref_err is None


def test_row_errors_of_a_non_contiguous_layout(device):
    """A channels-last view and a transposed one give the rows of their logical layout."""
    model, ref, target = make_inputs((4, 3, 9, 10), F32, device, seed=8)
    channels_last = model.to(memory_format=torch.channels_last)
    transposed = ref.transpose(2, 3).contiguous().transpose(2, 3)
    assert not channels_last.is_contiguous() and not transposed.is_contiguous()
    model_err, ref_err = fastpref.row_errors(channels_last, target, ref_pred=transposed)
    assert_close("model_err", model_err, reference_errors(model, target), 2e-6)
    assert_close("ref_err", ref_err, reference_errors(ref, target), 2e-6)


def test_row_errors_are_the_errors_of_the_losses(device):
    """KTO's baseline and model_mse metric are means of these same per-row errors."""
    model, ref, target = make_inputs((6, 4, 8, 8), F32, device, seed=9, scale=0.2)
    labels = torch.tensor([1, 0, 1, 1, 0, 0], device=device)
    _, metrics = fastpref.kto_loss(model, ref, target, labels)
    model_err, ref_err = fastpref.row_errors(model, target, ref_pred=ref)
    assert_close("model_mse", metrics["model_mse"], model_err.mean(), 2e-6)
    assert_close("kl", metrics["kl"], (ref_err - model_err).mean().clamp(min=0), 2e-6, atol=1e-7)


def test_kto_baseline_is_the_clamped_reduced_gap(device):
    """kto_baseline = max(0, reduce(mean_k (r_k - m_k))): None gives the loss's own batch
    baseline; a stand-in cross-process mean moves it and is clamped after the reduction."""
    model, ref, target = make_inputs((6, 4, 8, 8), F32, device, seed=11, scale=0.2)
    gap = float((reference_errors(ref, target) - reference_errors(model, target)).mean())
    labels = torch.tensor([1, 0, 1, 1, 0, 0], device=device)
    own = fastpref.kto_baseline(model, target, ref_pred=ref)
    assert_close("kl", own, fastpref.kto_loss(model, ref, target, labels)[1]["kl"], 2e-6, atol=1e-7)
    for other in (abs(gap) + 0.01, -abs(gap) - 0.01):
        z = fastpref.kto_baseline(model, target, ref_pred=ref, reduce=lambda t, other=other: (t + other) / 2)
        assert z.shape == () and float(z) == pytest.approx(max(0.0, (gap + other) / 2), rel=1e-5, abs=1e-7)


def test_row_errors_are_detached_and_never_sync(device):
    model, ref, target = make_inputs((4, 4, 8, 8), BF16, device, seed=10)
    model.requires_grad_(True)
    with FailOnHostSync():
        model_err, ref_err = fastpref.row_errors(model, target, ref_pred=ref)
    assert not model_err.requires_grad and not ref_err.requires_grad


def _bad_inputs(device):
    good = torch.randn(4, 3, 5, device=device)
    yield "model_pred", TypeError, lambda: fastpref.row_errors(good.numpy() if device.type == "cpu" else None, good)
    yield "model_pred", TypeError, lambda: fastpref.row_errors(good.long(), good)
    yield "model_pred", ValueError, lambda: fastpref.row_errors(good[0, 0], good[0, 0])
    yield "target", ValueError, lambda: fastpref.row_errors(good, good[:3])
    yield "ref_pred", ValueError, lambda: fastpref.row_errors(good, good, ref_pred=good.transpose(1, 2))
    yield "ref_pred", TypeError, lambda: fastpref.row_errors(good, good, ref_pred=good.int())
    yield "target", ValueError, lambda: fastpref.row_errors(good, torch.randn(4, 3, 5, device="meta"))


@pytest.mark.parametrize("index", range(7))
def test_bad_input_names_the_argument(index, device, no_launch):
    from helpers import assert_bad_input_case

    assert_bad_input_case(_bad_inputs, index, device)
