"""The trainer's speed options (fastpref.training.speed) on the bundled tiny SD model: a
channels-last, fused-AdamW, SDPA-back-end or regionally compiled step gives the regular step's
losses and weights to float tolerance; every refusal names its flag before anything is written."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from train_helpers import tiny_run

from fastpref.training.args import DEFAULT_MODEL
from fastpref.training.config import parse_config
from fastpref.training.speed import check_speed, fp8_filter, regional_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer's device


def _steps(run, count: int = 2):
    """``count`` optimizer steps of ``run``'s loop step on its first micro-batches: the metrics
    of each, the trainable parameters after and the trainable parameters before."""
    before = [p.detach().clone() for p in run.params]
    metrics = []
    for step in range(count):
        metrics.append({k: v.detach().clone() for k, v in run.step([run.batch(step * run.per_process)]).items()})
        run.lr_scheduler.step()
    return metrics, [p.detach().clone() for p in run.params], before


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    (metrics_a, params_a, before_a), (metrics_b, params_b, before_b) = a, b
    for step_a, step_b in zip(metrics_a, metrics_b, strict=True):
        for key in ("loss", "grad_norm", "implicit_acc"):
            torch.testing.assert_close(step_b[key], step_a[key], rtol=rtol, atol=atol, msg=key)
    for p, q in zip(before_a, before_b, strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)  # both runs started from the same weights
    assert any(not torch.equal(p, q) for p, q in zip(params_a, before_a, strict=True))  # the steps did train
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def regular():
    return _steps(tiny_run(DEVICE, False, "dpo"))


@pytest.fixture
def tf32_restored():
    """``--allow_tf32`` sets process-wide flags: put them back after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_channels_last_fused_adam_and_sdpa_backend_match_the_regular_step(regular, tf32_restored):
    run = tiny_run(DEVICE, False, "dpo", channels_last=True, use_fused_adam=True, sdpa_backend="math", allow_tf32=True)
    conv = run.family.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert run.optimizer.defaults["fused"] is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    _assert_same(regular, _steps(run))


def test_compiled_denoiser_matches_the_regular_step(regular):
    run = tiny_run(DEVICE, False, "dpo", compile_denoiser=True, compile_backend="aot_eager")
    blocks = regional_blocks(run.family.denoiser)
    assert blocks and all(type(b).__name__ == "BasicTransformerBlock" for b in blocks)  # diffusers' regional list
    assert all(b._compiled_call_impl is not None for b in blocks)
    compiled = _steps(run)
    _assert_same(regular, compiled)
    first, second = (m["compile_s"] for m in compiled[0])
    assert float(first) > 0 and torch.equal(second, first)  # timed once, at the compiling first step


def _config(**flags):
    return parse_config(pretrained_model_name_or_path=str(DEFAULT_MODEL), report_to="none", **flags)


@pytest.mark.parametrize(
    ("flags", "where", "match"),
    [
        (dict(fp8=True), dict(cuda_available=False), "--fp8: needs"),
        (dict(fp8=True), dict(cuda_available=True, capability=(8, 0)), "--fp8"),
        (dict(sdpa_backend="cudnn"), dict(cuda_available=False), "--sdpa_backend cudnn"),
        (dict(sdpa_backend="efficient"), dict(cuda_available=False), "--sdpa_backend efficient"),
        (dict(use_fused_adam=True, cuda_graph=True), dict(cuda_available=False), "--use_fused_adam"),
    ],
)
def test_refusals_name_the_flag(flags, where, match):
    with pytest.raises(ValueError, match=match):
        check_speed(_config(**flags), **where)


def test_fp8_refused_without_torchao_or_an_fp8_gpu(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="--fp8: needs torchao"):
        check_speed(_config(fp8=True), cuda_available=True, capability=(9, 0))


def test_channels_last_refused_for_a_transformer_family_before_any_write(tmp_path, monkeypatch):
    from fastpref.training.validation import validate

    pipeline = tmp_path / "sd3"
    (pipeline / "transformer").mkdir(parents=True)
    with pytest.raises(ValueError, match="--channels_last: only for UNet families"):
        check_speed(_config(channels_last=True).replace(pretrained_model_name_or_path=str(pipeline)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--sdpa_backend cudnn"):
        validate(_config(sdpa_backend="cudnn", output_dir=str(out)))
    assert not out.exists()


def test_fp8_converts_only_the_tile_sized_base_linears():
    """``--fp8``'s filter (torchao itself needs an FP8 GPU): base ``nn.Linear`` layers whose
    dimensions are multiples of 16, never LoRA's adapter matrices nor other modules."""
    assert fp8_filter(torch.nn.Linear(32, 64), "down_blocks.0.attn.to_q.base_layer")
    assert not fp8_filter(torch.nn.Linear(32, 64), "down_blocks.0.attn.to_q.lora_A.default")
    assert not fp8_filter(torch.nn.Linear(40, 64), "mid_block.proj")
    assert not fp8_filter(torch.nn.Conv2d(32, 64, 3), "conv_in")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--cuda_graph, inductor on CUDA)")
def test_cuda_graph_with_the_speed_options_matches_the_eager_step():
    """``--cuda_graph`` with ``--compile_denoiser`` (inductor), ``--channels_last``,
    ``--use_fused_adam`` (fused and capturable) and ``--sdpa_backend math``: 3 side-stream warm-up
    steps (the first compiles), the capture and two replays give the eager regular step's losses
    and weights (fp32; inductor's reassociation only)."""
    eager = tiny_run("cuda", False, "dpo", random_crop=False)
    fast = tiny_run(
        "cuda",
        True,
        "dpo",
        random_crop=False,
        compile_denoiser=True,
        channels_last=True,
        use_fused_adam=True,
        sdpa_backend="math",
    )
    assert fast.optimizer.defaults["fused"] and fast.optimizer.defaults["capturable"]
    metrics_a, params_a, _ = _steps(eager, 6)
    metrics_b, params_b, _ = _steps(fast, 6)
    for step, (a, b) in enumerate(zip(metrics_a, metrics_b, strict=True)):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(b[key], a[key], rtol=2e-3, atol=1e-5, msg=f"{key} at step {step}")
    assert float(metrics_b[0]["compile_s"]) > 0
    for p, q in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(q, p, rtol=2e-3, atol=1e-5)
