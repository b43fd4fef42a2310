"""The static-buffer training step (what ``--cuda_graph`` captures) against the regular step,
run without capture on the kernels' device (the CPU under Triton's interpreter, or CUDA); the
tensor-LR optimizer against the regular one under every LR schedule; the checks before a
capture; the twin-run comparison of tests/test_train_cuda_graph.py proven on the CPU; and the
clear refusals of ``--cuda_graph``."""

from contextlib import contextmanager

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from diffusers.optimization import get_scheduler
from graph_twins import TOLERANCES, Run, StaleInputs, assert_twins_agree, graph_step, run_trainer
from helpers import needs_kernels
from train_helpers import FAST, tiny_step

from fastpref import train
from fastpref.training.args import DEFAULT_DATA, LR_SCHEDULERS
from fastpref.training.batches import Batch, paired_batch
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.graph import StaticStep, check_capturable_optimizer, graph_refusal, make_optimizer
from fastpref.training.step import TrainStep

# the device of the tests that launch no kernel: CUDA where there is one, as the trainer's
TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup(device, static: bool, loss_type: str):
    return tiny_step(device, static, loss_type)


@contextmanager
def _deterministic(device):
    """On CUDA, kernels with a fixed reduction order (the math attention back-end, cuDNN's
    deterministic algorithms), so two runs of one step on equal values agree bit for bit as
    they do on the CPU; nothing to change on the CPU."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("loss_type", ["dpo", "dspo"])
def test_static_buffer_step_matches_the_regular_step(loss_type, device):
    """Same optimizer on both sides: the static-buffer path must give bit-identical numbers."""
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    params_a, regular, sched_a, enc = _setup(device, True, loss_type)
    params_b, inner, sched_b, _ = _setup(device, True, loss_type)
    static = StaticStep(inner, use_graph=False)
    lr_tensor = inner.optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr_tensor) and torch.equal(params_a[0], params_b[0])
    for step in range(4):
        batches = [paired_batch(pairs, list(range(4 * step + 2 * m, 4 * step + 2 * m + 2)), enc) for m in range(2)]
        with _deterministic(device):
            out_a, out_b = regular(batches), static(batches)
        if step == 0:
            buffers = [t.data_ptr() for b in static.inputs for t in b]
        assert [t.data_ptr() for b in static.inputs for t in b] == buffers  # filled in place, never reallocated
        assert all(torch.equal(s, b) for s, b in zip(static.inputs[1], batches[1], strict=True))
        assert out_a.keys() == out_b.keys() and {"loss", "grad_norm", "implicit_acc"} <= out_a.keys()
        assert all(torch.equal(out_b[key], out_a[key]) for key in out_a), step
        sched_a.step()
        sched_b.step()
        assert inner.optimizer.param_groups[0]["lr"] is lr_tensor  # the scheduler fills the same tensor
        assert float(lr_tensor) == pytest.approx([1e-3, 2e-3, 1.5e-3, 1e-3][step], rel=1e-6)  # warm-up 2, linear decay
    assert any(not torch.equal(a, a0) for a, a0 in zip(params_a, _setup(device, False, loss_type)[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_static_optimizer_follows_the_float_optimizer():
    """The tensor-LR AdamW that a captured step needs (capturable on CUDA), driven by the same LR
    schedule, moves the weights as the regular float-LR AdamW does (to rounding of the LR in
    float32)."""
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(7, 5, generator=g).to(TORCH_DEVICE), torch.randn(5, generator=g).to(TORCH_DEVICE)]
    runs = []
    for static in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make_optimizer(params, 1e-2, static=static, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        schedule = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=10)
        grads = torch.Generator().manual_seed(4)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads).to(TORCH_DEVICE)
            optimizer.step()
            schedule.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        assert not torch.equal(a, start[0] if a.ndim == 2 else start[1])
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_static_step_rejects_a_batch_of_another_shape(device):
    params, inner, _, enc = _setup(device, True, "dpo")
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
    path = save_checkpoint(
        tmp_path, 3, trainable={"w": params[0]}, optimizer=optimizer, lr_scheduler=schedule, data_position=0
    )
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
def test_forward_backward_of_the_step_makes_no_host_sync(loss_type, device):
    """Both UNet forwards, the loss, backward and the metric accumulation over 2 micro-batches
    stay on the device. (AdamW reads its step count on the host unless capturable, which needs
    CUDA: tests/test_train_cuda_graph.py checks the captured optimizer step there.)"""
    from helpers import FailOnHostSync

    from fastpref.training.batches import image_batch
    from fastpref.training.losses import LOSS_TYPES

    params, step, _, enc = _setup(device, True, loss_type)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    build = image_batch if LOSS_TYPES[loss_type].data == "images" else paired_batch
    batches = [build(pairs, [2 * m, 2 * m + 1], enc) for m in range(2)]
    with FailOnHostSync():
        metrics = step.forward_backward(batches)
    assert "loss" in metrics and all(v.ndim == 0 for v in metrics.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("loss_type", ["dpo", "dense_dpo", "rpo", "kto", "sdpo"])
def test_every_step_issues_the_ops_of_the_first(loss_type, device):
    """A CUDA graph replays the launches of its capture step with the scalar arguments frozen
    then. So every step must issue the same ops with the same non-tensor arguments, whatever
    the data and the learning rate: nothing in forward, backward, metric accumulation or
    clipping may depend on a Python value that changes from step to step. (The optimizer step
    is PyTorch's capturable AdamW, checked on the GPU by tests/test_train_cuda_graph.py.) One
    unrecorded step first, as a captured step follows its eager warm-up: it moves lazily placed
    state to the device (diffusers' scheduler copies its alphas to the latents' device on its
    first call, a copy that a CUDA machine sees once)."""
    from helpers import RecordOps

    from fastpref.training.batches import image_batch
    from fastpref.training.losses import LOSS_TYPES

    params, step, schedule, enc = _setup(device, True, loss_type)
    pairs = PreferencePairs(parquet_files(DEFAULT_DATA))
    build = image_batch if LOSS_TYPES[loss_type].data == "images" else paired_batch
    step([build(pairs, [12, 13], enc)])  # the warm-up step, unrecorded
    schedule.step()
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
    assert len({float(n) for n in norms}) == 3, "the steps must see different data"
    for index in (1, 2):
        first = next((i for i, (a, b) in enumerate(zip(recorded[0], recorded[index], strict=False)) if a != b), None)
        assert len(recorded[index]) == len(recorded[0]) and first is None, (
            f"step {index} differs from step 0 at op {first}: "
            f"{recorded[0][first] if first is not None else '-'} vs "
            f"{recorded[index][first] if first is not None else '-'}"
        )


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_lr_scheduler_gives_the_regular_lrs(name):
    """Every --lr_scheduler sets the tensor LR of the static optimizer (what --cuda_graph runs)
    to the regular optimizer's float LR, step for step over 100 steps with warm-up: bitwise up
    to the storage, i.e. the tensor holds exactly the float32 rounding of the float LR (the
    scheduler computes the same float64 value on both sides). Diffusers' polynomial schedule
    reads ``optimizer.defaults["lr"]`` as its fixed initial LR: a tensor there would be the one
    the scheduler overwrites, and the schedule would feed on itself."""
    lrs = []
    for static in (False, True):
        params = [torch.nn.Parameter(torch.ones(3, device=TORCH_DEVICE))]
        optimizer = make_optimizer(params, 1e-3, static=static, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        schedule = get_scheduler(name, optimizer, num_warmup_steps=10, num_training_steps=100)

        def lr(group=optimizer.param_groups[0]):  # a tensor LR is refilled in place: keep each value
            return group["lr"].clone() if torch.is_tensor(group["lr"]) else group["lr"]

        seen = [lr()]
        for _ in range(100):
            params[0].grad = torch.ones(3, device=TORCH_DEVICE)
            optimizer.step()
            schedule.step()
            seen.append(lr())
        lrs.append(seen)
    regular, static = lrs
    assert all(isinstance(lr, float) for lr in regular) and all(torch.is_tensor(lr) for lr in static)
    expected = [torch.tensor(lr, dtype=torch.float32).item() for lr in regular]  # host-ok: test
    got = [lr.item() for lr in static]  # host-ok: test
    off = [(i, g, e) for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not off, f"{name}: {len(off)} of {len(got)} LRs differ, first (step, static, regular): {off[:3]}"
    if name != "constant":  # the schedule moves (warm-up at least), so equal LRs are not a given
        assert len(set(regular)) > 10


def _tiny_optimizer(static=True, **flags):
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=g)), torch.nn.Parameter(torch.randn(2, generator=g))]
    if flags:
        return params, torch.optim.AdamW(params, lr=torch.tensor(1e-3), foreach=False, **flags)
    return params, make_optimizer(params, 1e-3, static=static, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)


def test_capture_refuses_an_optimizer_that_the_warm_up_did_not_run():
    """StaticStep checks the optimizer before capturing it: with no warm-up step (or a
    parameter that got its gradient but no state) AdamW would create its moments inside the
    graph, and every replay would zero them again. Raised before any CUDA call, so this runs
    on the CPU through StaticStep itself."""
    params, optimizer = _tiny_optimizer()
    x = torch.arange(3.0)
    step = TrainStep(lambda b: ((b[0] @ params[0]).sum() + params[1].sum(), {}), params, optimizer, max_grad_norm=1.0)
    static = StaticStep(step, use_graph=True, warmup_steps=0)
    with pytest.raises(
        RuntimeError,
        match=r"no state for 2 of its 2 parameters .*param_groups\[0\] parameter 0, "
        r"shape \(3, 2\).*warm-up steps did not run the optimizer",
    ):
        static([(x,)])
    assert static.graph is None
    step([(x,)])  # an eager step makes the state ...
    params.append(torch.nn.Parameter(torch.ones(4)))  # ... but not for a parameter that gets a gradient later
    optimizer.add_param_group({"params": [params[2]]})
    params[2].grad = torch.ones(4)
    with pytest.raises(RuntimeError, match=r"no state for 1 of its 3 parameters .*param_groups\[1\] parameter 0"):
        check_capturable_optimizer(optimizer)


def test_capture_refuses_an_optimizer_that_is_not_capturable():
    """After a warm-up, the groups must be capturable and each step count on its parameter's
    device (a state_dict loaded into the optimizer can undo both)."""
    params, optimizer = _tiny_optimizer()  # on the CPU: the single-tensor AdamW, not capturable
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] has capturable=False"):
        check_capturable_optimizer(optimizer)
    params, optimizer = _tiny_optimizer(capturable=True)
    for p in params:  # the state a capturable warm-up leaves, step counts on the parameters' device
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p),
        }
    check_capturable_optimizer(optimizer)
    optimizer.state[params[1]]["step"] = torch.tensor(1.0, device="meta")  # stands in for another device
    with pytest.raises(RuntimeError, match=r"step count of param_groups\[0\] parameter 1 is on meta"):
        check_capturable_optimizer(optimizer)


# --- the twin-run comparison that tests/test_train_cuda_graph.py applies to every mode's replays,
# run here with the static-buffer step called without capture against the regular eager run

TWIN_STEPS = 3
_TWINS: dict = {}


def _twin_flags(precision, reference, loss_type):
    return [
        *FAST,
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(TWIN_STEPS),
        "--report_to",
        "csv",
        "--checkpointing_steps",
        "100",
        "--mixed_precision",
        precision,
        "--reference",
        reference,
        "--loss_type",
        loss_type,
    ]


def _eager_twin(tmp_path_factory, mode):
    """The regular eager run of ``mode`` (no --cuda_graph), run once per session."""
    if mode not in _TWINS:
        _TWINS[mode] = run_trainer(_twin_flags(*mode), tmp_path_factory.mktemp("twin"))
    return _TWINS[mode]


# the trainer puts its tensors on CUDA where there is a GPU (and the CPU run needs the interpreter)
on_cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason=(
        "the CPU proof of the twin comparison (the trainer runs on CUDA here): tests/test_train_cuda_graph.py "
        "applies it to the replays on this machine"
    ),
)


@on_cpu_only
@needs_kernels
@pytest.mark.parametrize("mode", [("bf16", "lora", "dpo"), ("no", "copy", "kto")], ids="-".join)
def test_static_step_runs_agree_with_their_eager_twins(tmp_path_factory, mode):
    """``--cuda_graph`` with its StaticStep called on the static buffers (no capture; the
    trainer's graph wiring otherwise: tensor-LR optimizer, autocast without its cache) takes the
    regular eager run's steps, by the comparison the GPU test makes of the replays."""
    twin = _eager_twin(tmp_path_factory, mode)
    subject = run_trainer(
        [*_twin_flags(*mode), "--cuda_graph"],
        tmp_path_factory.mktemp("static"),
        static_step=graph_step(False),
        graph_on_cpu=True,
    )
    assert_twins_agree(subject, twin, TOLERANCES[mode[0]], first=1)


@on_cpu_only
@needs_kernels
def test_twin_comparison_catches_a_step_on_stale_inputs(tmp_path_factory):
    """The negative controls: a static step whose buffers keep the first step's batches (what
    a replay that missed its input copies computes) fails the comparison; so do two runs that
    agree but whose metrics repeat across steps (data that never change prove nothing)."""
    mode = ("bf16", "lora", "dpo")
    twin = _eager_twin(tmp_path_factory, mode)
    stale = run_trainer(
        [*_twin_flags(*mode), "--cuda_graph"],
        tmp_path_factory.mktemp("stale"),
        static_step=graph_step(False, StaleInputs),
        graph_on_cpu=True,
    )
    assert all(stale.rows[0][k] == v for k, v in twin.rows[0].items() if k != "lr")  # the first step is fresh
    with pytest.raises(AssertionError, match="against the eager twin's"):
        assert_twins_agree(stale, twin, TOLERANCES[mode[0]], first=1)
    frozen = Run([dict(twin.rows[0], step=r["step"]) for r in twin.rows], twin.initial, twin.final)
    with pytest.raises(AssertionError, match="no prediction error tells the subject's inputs from step 1's"):
        assert_twins_agree(frozen, frozen, TOLERANCES[mode[0]], first=1)
