"""The static-buffer training step (what ``--cuda_graph`` captures) against the regular step,
run on the CPU without capture; and the clear refusals of ``--cuda_graph``."""
import pytest

pytest.importorskip("diffusers", reason="the training tests need the train extra (diffusers), which `make test` installs where a package index is reachable")

import torch
from diffusers.optimization import get_scheduler

from fastpref import train
from fastpref.training.args import DEFAULT_DATA
from fastpref.training.batches import Batch, paired_batch
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.graph import StaticStep, graph_refusal, make_optimizer
from train_helpers import FAST, tiny_step

CPU = torch.device("cpu")


def _setup(static: bool, loss_type: str):
    return tiny_step(CPU, static, loss_type)


@pytest.mark.parametrize("loss_type", ["dpo", "dspo"])
def test_static_buffer_step_matches_the_regular_step(loss_type):
    """Same optimizer on both sides: the static-buffer path must give bit-identical numbers."""
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    params_a, regular, sched_a, enc = _setup(True, loss_type)
    params_b, inner, sched_b, _ = _setup(True, loss_type)
    static = StaticStep(inner, use_graph=False)
    lr_tensor = inner.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr_tensor) and torch.equal(params_a[0], params_b[0])
    for step in range(4):
        batches = [paired_batch(pairs, list(range(4 * step + 2 * m, 4 * step + 2 * m + 2)), enc) for m in range(2)]
        out_a, out_b = regular(batches), static(batches)
        if step == 0:
            buffers = [t.data_ptr() for b in static.inputs for t in b]
        assert [t.data_ptr() for b in static.inputs for t in b] == buffers  # filled in place, never reallocated
        assert all(torch.equal(s, b) for s, b in zip(static.inputs[1], batches[1]))
        assert out_a.keys() == out_b.keys() and {"loss", "grad_norm", "implicit_acc"} <= out_a.keys()
        assert all(torch.equal(out_b[key], out_a[key]) for key in out_a), step
        sched_a.step()
        sched_b.step()
        assert inner.optimizer.param_groups[0]["lr"] is lr_tensor  # the scheduler fills the same tensor
        assert float(lr_tensor) == pytest.approx([1e-3, 2e-3, 1.5e-3, 1e-3][step], rel=1e-6)  # warm-up 2, linear decay
    assert any(not torch.equal(a, a0) for a, a0 in zip(params_a, _setup(False, loss_type)[0]))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_static_optimizer_follows_the_float_optimizer():
    """The tensor-LR AdamW that a captured step needs, driven by the same LR schedule, moves the
    weights as the regular float-LR AdamW does (to rounding of the LR in float32)."""
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    runs = []
    for static in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make_optimizer(params, 1e-2, static=static, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        schedule = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=10)
        grads = torch.Generator().manual_seed(4)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
            schedule.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert not torch.equal(a, start[0] if a.ndim == 2 else start[1])
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_static_step_rejects_a_batch_of_another_shape():
    params, inner, _, enc = _setup(True, "dpo")
    static = StaticStep(inner, use_graph=False)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    static([paired_batch(pairs, [0, 1], enc)])
    with pytest.raises(ValueError, match=r"batch.latents: expected \(4, 4, 8, 8\) torch.float32 .*got \(2, 4, 8, 8\)"):
        static([paired_batch(pairs, [2], enc)])
    with pytest.raises(ValueError, match="expected 1 micro-batches"):
        static([paired_batch(pairs, [2, 3], enc)] * 2)
    assert isinstance(static.inputs[0], Batch)


def test_cuda_graph_refusals_name_the_reason():
    assert graph_refusal(cuda_available=True, gradient_checkpointing=False, world_size=1) is None
    assert "needs a CUDA device" in graph_refusal(cuda_available=False, gradient_checkpointing=False, world_size=1)
    message = graph_refusal(cuda_available=True, gradient_checkpointing=True, world_size=1)
    assert "--gradient_checkpointing" in message and "RNG state" in message
    assert "WORLD_SIZE=2" in graph_refusal(cuda_available=True, gradient_checkpointing=False, world_size=2)


def test_cuda_graph_flag_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--cuda_graph: needs a CUDA device"):
        train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", "--cuda_graph"])
    assert not out.exists()


def test_checkpoint_round_trip_keeps_the_tensor_lr(tmp_path):
    """A resumed captured step must read the same LR tensor object, refilled from state.json."""
    from fastpref.training.checkpoint import load_checkpoint, save_checkpoint

    def make():
        params = [torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))]
        optimizer = make_optimizer(params, 1e-2, static=True, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
        return params, optimizer, get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)

    def step(params, optimizer, schedule, value):
        params[0].grad = torch.full((2, 3), value)
        optimizer.step()
        schedule.step()

    params, optimizer, schedule = make()
    for i in range(3):
        step(params, optimizer, schedule, i + 1.0)
    path = save_checkpoint(tmp_path, 3, trainable={"w": params[0]}, optimizer=optimizer, lr_scheduler=schedule,
                           data_position=0)
    params2, optimizer2, schedule2 = make()
    lr_tensor = optimizer2.param_groups[0]["lr"]
    tensors, _ = load_checkpoint(path, optimizer2, schedule2)
    with torch.no_grad():
        params2[0].copy_(tensors["w"])
    assert optimizer2.param_groups[0]["lr"] is lr_tensor
    assert torch.equal(lr_tensor, optimizer.param_groups[0]["lr"])
    for i in range(3):
        step(params, optimizer, schedule, -i - 1.0)
        step(params2, optimizer2, schedule2, -i - 1.0)
        assert torch.equal(lr_tensor, optimizer.param_groups[0]["lr"]) and torch.equal(params2[0], params[0])


@pytest.mark.parametrize("loss_type", ["dpo", "dspo_sdxl", "dense_dpo", "rpo", "kto", "mapo", "sdpo"])
def test_forward_backward_of_the_step_makes_no_host_sync(loss_type):
    """Both UNet forwards, the loss, backward and the metric accumulation over 2 micro-batches
    stay on the device. (AdamW reads its step count on the host unless capturable, which needs
    CUDA: tests/test_train_cuda_graph.py checks the captured optimizer step there.)"""
    from helpers import FailOnHostSync

    from fastpref.training.batches import image_batch
    from fastpref.training.losses import LOSS_TYPES

    params, step, _, enc = _setup(True, loss_type)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    build = image_batch if LOSS_TYPES[loss_type].data == "images" else paired_batch
    batches = [build(pairs, [2 * m, 2 * m + 1], enc) for m in range(2)]
    with FailOnHostSync():
        metrics = step.forward_backward(batches)
    assert "loss" in metrics and all(v.ndim == 0 for v in metrics.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("loss_type", ["dpo", "dense_dpo", "rpo", "kto", "sdpo"])
def test_every_step_issues_the_ops_of_the_first(loss_type):
    """A CUDA graph replays the launches of its capture step with the scalar arguments frozen
    then. So every step must issue the same ops with the same non-tensor arguments, whatever
    the data and the learning rate: nothing in forward, backward, metric accumulation or
    clipping may depend on a Python value that changes from step to step. (The optimizer step
    is PyTorch's capturable AdamW, checked on the GPU by tests/test_train_cuda_graph.py.)"""
    from helpers import RecordOps

    from fastpref.training.batches import image_batch
    from fastpref.training.losses import LOSS_TYPES

    params, step, schedule, enc = _setup(True, loss_type)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    build = image_batch if LOSS_TYPES[loss_type].data == "images" else paired_batch
    recorded, norms = [], []
    for index in range(3):
        batches = [build(pairs, [4 * index + 2 * m, 4 * index + 2 * m + 1], enc) for m in range(2)]
        with RecordOps() as record:
            step.forward_backward(batches)
            norms.append(torch.nn.utils.clip_grad_norm_(step.params, step.max_grad_norm))
        recorded.append(record.ops)
        step.optimizer.step()
        schedule.step()
    assert len(recorded[0]) > 100, "the recorder saw too few ops to be watching the step"
    assert len(set(float(n) for n in norms)) == 3, "the steps must see different data"
    for index in (1, 2):
        first = next((i for i, (a, b) in enumerate(zip(recorded[0], recorded[index])) if a != b), None)
        assert len(recorded[index]) == len(recorded[0]) and first is None, \
            (f"step {index} differs from step 0 at op {first}: "
             f"{recorded[0][first] if first is not None else '-'} vs {recorded[index][first] if first is not None else '-'}")
