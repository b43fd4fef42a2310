"""The metrics of an eager loss call (fastpref/loss_metrics.py): a mapping with a dict's
behaviour whose views into the call's one output buffer are made on first access. Checked here:
a call whose metrics are not read makes no tensor view at all (its only aten ops are the two
allocations); on first access every metric appears, in the method's order, with the values,
shapes and dtypes of the same buffer read through `Layout.unpack`; values read later equal
values read at once; and the dict operations trainers and libraries use work."""

import contextlib
import copy
import pickle

import pytest
import torch
from loss_calls import CALLS, call
from torch.utils._python_dispatch import TorchDispatchMode

import fastpref
from fastpref.kernels import PRESETS
from fastpref.loss_metrics import LossMetrics


class AtenOps(TorchDispatchMode):
    """The names of the aten ops dispatched inside the block (the test suite poisons kernel outputs,
    conftest.py: an allocation is then a `full`)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _inputs(seed, shape=(4, 3, 5, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g).to(dtype)
    ref = (target.double() + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    model = (ref.double() + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    return model.requires_grad_(True), ref, target


def _expected_names(name):
    """The metric names of preset `name` in layout order (SDPO drops its safeguard metrics
    without the safeguard, and its branch unless the base is DSPO)."""
    method, kwargs = PRESETS[name]
    names = list(method.layout.names)
    if method.name == "sdpo":
        if not kwargs.get("safeguard", True):
            names = [n for n in names if not n.startswith("safeguard_")]
        if kwargs.get("base", "dpo") != "dspo":
            names.remove("dspo_branch")
    return names


@contextlib.contextmanager
def no_launches():
    """Every Triton launch a no-op (the interpreter's own host copies would dispatch ops)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}
    for cls in originals:
        cls.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


# What loss_calls.call does to make a preset's extra inputs (labels, timesteps) and what the
# losses do to their constant inputs (detach): not the call's own outputs.
INPUT_OPS = {"arange", "mul", "remainder", "ne", "_to_copy", "detach"}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_unread_metrics_make_no_view(name):
    x, r, t = _inputs(1)
    call(name, x, r, t)  # warm-up: plans and geometry cached
    with no_launches(), AtenOps() as ops:
        loss, metrics = call(name, x, r, t)
    assert isinstance(metrics, LossMetrics)
    own = [op for op in ops.names if op not in INPUT_OPS]
    assert own in (["empty"] * 2, ["full"] * 2), ops.names  # the loss and the one buffer: no view, no copy
    with no_launches(), AtenOps() as ops:
        loss.backward()
    allocations = [op for op in ops.names if op in ("empty_like", "full", "empty")]
    assert allocations in (["empty_like"], ["full"]), ops.names  # the gradient, and no view of the buffer
    assert not {"slice", "select", "split_with_sizes", "unbind", "view", "as_strided"} & set(ops.names), ops.names
    with AtenOps() as ops:
        metrics["loss"]
    assert ops.names, "reading a metric makes its views"
    with AtenOps() as ops:
        list(metrics.items())
    assert ops.names == [], "the views are made once"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_metrics_are_the_buffer_unpacked(name):
    x, r, t = _inputs(2)
    loss, metrics = call(name, x, r, t)
    method = PRESETS[name][0]
    layout, buf, pairs, drop = metrics._source  # the call's buffer, before first access
    assert list(metrics) == _expected_names(name)
    start = len(layout.ints) * (8 // buf.element_size())
    ints = buf[:start].view(torch.int64) if layout.ints else None
    expected = layout.unpack(buf[start : start + layout.size(pairs)], ints, pairs, drop)
    assert list(expected) == list(metrics)
    for key, value in expected.items():
        got = metrics[key]
        assert got.shape == value.shape and got.dtype == value.dtype, key
        assert got.data_ptr() == value.data_ptr(), f"{key}: a view of the call's buffer, not a copy"
        assert torch.equal(got, value), key
        assert not got.requires_grad, key
    assert torch.equal(metrics["loss"], loss.detach()), "the loss metric is the loss"
    assert method.layout.names[0] == "loss"


@pytest.mark.parametrize("name", ["dpo_sigmoid", "dspo_sdxl", "rpo", "kto"])
def test_read_later_equals_read_at_once(name):
    x, r, t = _inputs(3)
    loss_now, now = call(name, x, r, t)
    at_once = {key: value.clone() for key, value in now.items()}
    loss_later, later = call(name, x, r, t)
    loss_later.backward()  # a backward pass and another call in between
    call(name, *_inputs(4))
    assert list(later) == list(at_once)
    for key, value in at_once.items():
        torch.testing.assert_close(later[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_dict_behaviour():
    x, r, t = _inputs(5)
    _, metrics = fastpref.diffusion_dpo_loss(x, r, t, beta=500.0)
    names = list(metrics)
    assert "implicit_acc" in metrics and "nope" not in metrics and len(metrics) == len(names) == 10
    plain = dict(metrics)
    assert list(plain) == names and all(plain[k] is metrics[k] for k in names)
    assert {**metrics}.keys() == plain.keys() and metrics.copy() == plain and type(metrics.copy()) is dict
    assert list(metrics.keys()) == names and list(metrics.values())[0] is metrics["loss"]
    assert metrics.get("nope") is None and metrics.get("loss") is metrics["loss"]
    metrics["grad_norm"] = torch.tensor(1.5)  # what the trainer's step adds
    del metrics["ref_mse_l"]
    assert list(metrics)[-1] == "grad_norm" and "ref_mse_l" not in metrics
    assert metrics.pop("grad_norm").item() == 1.5  # host-ok: test
    assert repr(metrics).startswith("LossMetrics({'loss': tensor(")
    with pytest.raises(KeyError):
        metrics["nope"]


def test_rebuilt_from_values_like_a_dict():
    """`type(m)(mapping)` (how accelerate's and torch's recursive helpers rebuild a mapping),
    pickle and deepcopy give a LossMetrics of the same values."""
    x, r, t = _inputs(6)
    _, metrics = fastpref.dspo_loss(x, r, t, variant="sdxl")
    doubled = type(metrics)({k: v * 2 for k, v in metrics.items()})
    assert isinstance(doubled, LossMetrics) and list(doubled) == list(metrics)
    torch.testing.assert_close(doubled["model_mse"], 2 * metrics["model_mse"])
    for clone in (pickle.loads(pickle.dumps(metrics)), copy.deepcopy(metrics)):
        assert isinstance(clone, LossMetrics) and list(clone) == list(metrics)
        for key in metrics:
            assert torch.equal(clone[key], metrics[key]), key
    assert LossMetrics(a=1)["a"] == 1 and len(LossMetrics()) == 0
