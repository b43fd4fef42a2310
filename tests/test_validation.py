"""Bad input raises ValueError/TypeError naming the argument, before any kernel launch."""

import subprocess
import sys

import pytest
import torch
from helpers import assert_bad_input_case, bad_input_case_ids, make_inputs
from loss_calls import CALLS, call

import fastpref


def good(device, shape=(4, 3, 5, 5)):
    return make_inputs(shape, torch.float32, device, 0)


def cases(device):
    p, r, t = good(device)
    odd = good(device, (3, 3, 5, 5))
    ints = p.to(torch.int32)
    yield (
        "model_pred",
        TypeError,
        lambda: fastpref.diffusion_dpo_loss(p.numpy() if p.device.type == "cpu" else 1.0, r, t),
    )
    yield "model_pred", TypeError, lambda: fastpref.diffusion_dpo_loss(ints, r, t)
    yield "ref_pred", TypeError, lambda: fastpref.diffusion_dpo_loss(p, r.to(torch.int64), t)
    yield "target", TypeError, lambda: fastpref.dspo_loss(p, r, t.bool())
    yield "ref_pred", ValueError, lambda: fastpref.diffusion_dpo_loss(p, r[:, :2], t)
    yield "target", ValueError, lambda: fastpref.dspo_loss(p, r, t.reshape(4, 75))
    yield "target", ValueError, lambda: fastpref.sft_loss(p, t[:2])
    yield "model_pred", ValueError, lambda: fastpref.diffusion_dpo_loss(p[:, 0, 0, 0], r[:, 0, 0, 0], t[:, 0, 0, 0])
    yield "model_pred", ValueError, lambda: fastpref.diffusion_dpo_loss(*odd)
    yield "model_pred", ValueError, lambda: fastpref.dspo_loss(*odd)
    yield "model_pred", ValueError, lambda: fastpref.sft_loss(odd[0], odd[2], winners_only=True)
    yield "model_pred", ValueError, lambda: fastpref.diffusion_dpo_loss(p[:0], r[:0], t[:0])
    yield "model_pred", ValueError, lambda: fastpref.diffusion_dpo_loss(p[:, :0], r[:, :0], t[:, :0])
    yield "loss_type", ValueError, lambda: fastpref.diffusion_dpo_loss(p, r, t, loss_type="cpo")
    yield "variant", ValueError, lambda: fastpref.dspo_loss(p, r, t, variant="sd3")
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        yield "beta", ValueError, lambda bad=bad: fastpref.diffusion_dpo_loss(p, r, t, beta=bad)
        yield "beta", ValueError, lambda bad=bad: fastpref.dspo_loss(p, r, t, beta=bad)
    yield "beta", TypeError, lambda: fastpref.diffusion_dpo_loss(p, r, t, beta=torch.tensor(1.0))
    yield "sdxl_threshold", ValueError, lambda: fastpref.dspo_loss(p, r, t, sdxl_threshold=float("nan"))
    yield "method", ValueError, lambda: fastpref.PreferenceLoss("orpo")
    yield "beta", ValueError, lambda: fastpref.PreferenceLoss("dpo", beta=float("inf"))
    yield "loss_type", ValueError, lambda: fastpref.PreferenceLoss("dpo", loss_type="cpo")
    yield "gamma", ValueError, lambda: fastpref.PreferenceLoss("dpo", gamma=0.9)
    yield "ref_pred", ValueError, lambda: fastpref.PreferenceLoss("dpo")(p, None, t)


@pytest.mark.parametrize("index", range(len(bad_input_case_ids(cases))), ids=bad_input_case_ids(cases))
def test_bad_input_raises_naming_the_argument(index, device, no_launch):
    assert_bad_input_case(cases, index, device)


CONSTANT_CASES = [
    (name, arg) for name in sorted(CALLS) for arg in ("ref_pred", "target") if CALLS[name][1] or arg == "target"
]


@pytest.mark.parametrize("name,argument", CONSTANT_CASES, ids=[f"{n}-{a}" for n, a in CONSTANT_CASES])
def test_reference_or_target_that_requires_grad_is_refused(name, argument, device, no_launch):
    """ref_pred and target are constants (docs/methods.md §1): one that requires grad (a leaf or the
    output of a graph) is refused before any launch, naming it and saying to detach it,
    instead of silently getting no gradient."""
    model, ref, target = good(device)
    model.requires_grad_(True)
    source = torch.ones((), device=device, requires_grad=True)
    if argument == "ref_pred":
        ref = ref * source if name.startswith("dpo") else ref.requires_grad_(True)
    else:
        target = target * source if name.startswith("dpo") else target.requires_grad_(True)
    with pytest.raises(ValueError, match=rf"{argument} requires grad.*pass {argument}\.detach\(\)"):
        call(name, model, ref, target)


@pytest.mark.parametrize("argument", ["ref_pred", "target"])
def test_row_errors_and_kto_baseline_refuse_inputs_that_require_grad(argument, device, no_launch):
    model, ref, target = good(device)
    model.requires_grad_(True)  # the policy's prediction may require grad
    kw = {"ref_pred": ref, "target": target}
    kw[argument] = kw[argument].clone().requires_grad_(True)
    for fn in (fastpref.row_errors, fastpref.kto_baseline):
        with pytest.raises(ValueError, match=rf"{argument} requires grad.*{argument}\.detach\(\)"):
            fn(model, kw["target"], ref_pred=kw["ref_pred"])
    with pytest.raises(ValueError, match=rf"{argument} requires grad"):
        fastpref.PreferenceLoss("dpo")(model, kw["ref_pred"], kw["target"])


def test_mixed_devices_are_rejected(device, no_launch):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device beside the CPU")
    p, r, t = good(device)
    with pytest.raises(ValueError, match="ref_pred.*device"):
        fastpref.diffusion_dpo_loss(p, r.cpu(), t)


def test_mixed_devices_are_rejected_with_a_meta_tensor(device, no_launch):
    """Device mismatch is checked on metadata alone: a meta tensor stands in for a second device."""
    p, r, t = good(device)
    with pytest.raises(ValueError, match="target.*device"):
        fastpref.diffusion_dpo_loss(p, r, t.to("meta"))


def test_cpu_tensors_without_the_interpreter_are_rejected():
    """With TRITON_INTERPRET=0, CPU tensors get a clear error instead of a crash in Triton."""
    code = (
        "import torch, fastpref\n"
        "x = torch.randn(4, 3, 5)\n"
        "try:\n"
        "    fastpref.diffusion_dpo_loss(x, x, x)\n"
        "except ValueError as e:\n"
        "    assert 'model_pred' in str(e) and 'TRITON_INTERPRET' in str(e), e\n"
        "    print('REJECTED')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**_env(), "TRITON_INTERPRET": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "REJECTED" in out.stdout, out.stdout + out.stderr


def _env():
    import os

    return dict(os.environ)
