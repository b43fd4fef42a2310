"""Input checks that run before any kernel launch. Each error names the argument and the
expected and actual value. Checks read only metadata (shapes, dtypes, devices, Python
numbers), never tensor values, so they cost no host sync."""

import math

import torch

from fastpref.kernels import INTERPRET

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_prediction(name, x):
    """`x` must be a floating tensor of rank >= 2 with a nonzero leading dim and nonempty rows."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims [rows, ...], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have a nonzero leading dim, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one element per row, got shape {tuple(x.shape)}")


def check_like(name, x, ref_name, ref):
    """`x` must be a prediction of the same shape and device as `ref`."""
    check_prediction(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_device(name, x):
    """CUDA tensors run compiled kernels; CPU tensors need Triton's interpreter; meta tensors
    (shape inference) run no kernel."""
    if x.device.type in ("cuda", "meta"):
        return
    if x.device.type == "cpu":
        if not INTERPRET:
            raise ValueError(
                f"{name} is on the CPU but Triton's interpreter is off: pass CUDA tensors, or set "
                "TRITON_INTERPRET=1 before importing fastpref to run the kernels on the CPU"
            )
        return
    raise ValueError(f"{name} must be on a CUDA device (or the CPU under TRITON_INTERPRET=1, or meta), got {x.device}")


def check_constant(name, x):
    """`ref_pred` and `target` are constants of every loss (docs/methods.md §1): one that requires grad is
    refused rather than silently treated as constant (an eager block would propagate into it)."""
    if x.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the reference prediction and the target are constants of the loss "
            f"(no gradient flows into them): pass {name}.detach() (compute the reference under torch.no_grad())"
        )


def check_paired(name, x):
    """Paired layout: an even, nonzero number of rows (winners then losers)."""
    if x.shape[0] % 2:
        raise ValueError(
            f"{name} must hold 2B rows (B winners then B losers), got an odd leading dim {x.shape[0]} "
            f"in shape {tuple(x.shape)}"
        )


def check_positive_finite(name, value):
    """A float hyperparameter such as beta: finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_finite(name, value):
    """A float hyperparameter that may take any finite value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return choices.index(value)


class HyperparametersOnly:
    """Pass as model_pred to run only a loss's hyperparameter checks (PreferenceLoss.__init__):
    every loss checks its hyperparameters first, then `check_predictions` stops it here."""


class HyperparametersChecked(Exception):
    """Raised by `check_predictions` for the `HyperparametersOnly` stand-in."""


_FLOAT_SET = frozenset(FLOAT_DTYPES)
_DEVICES = frozenset(("cuda", "meta", "cpu") if INTERPRET else ("cuda", "meta"))


_KNOWN_DEVICES = {}


def _known_device(device):
    """Whether the kernels run on `device` (cached per device: `device.type` costs a microsecond)."""
    ok = _KNOWN_DEVICES[device] = device.type in _DEVICES
    return ok


def _valid(x, shape, device):
    return (
        isinstance(x, torch.Tensor)
        and x.dtype in _FLOAT_SET
        and x.shape == shape
        and x.device == device
        and not x.requires_grad
    )


def check_predictions(paired, model_pred, target, ref_pred=None):
    """All tensor checks of a loss call, in argument order. A call that passes them all is
    recognised in one expression first; the checks below then name what is wrong."""
    if model_pred is HyperparametersOnly:
        raise HyperparametersChecked
    if isinstance(model_pred, torch.Tensor):
        shape, device = model_pred.shape, model_pred.device
        if (
            model_pred.dtype in _FLOAT_SET
            and len(shape) >= 2
            and model_pred.numel() > 0
            and (_KNOWN_DEVICES.get(device) or _known_device(device))
            and _valid(target, shape, device)
            and (ref_pred is None or _valid(ref_pred, shape, device))
            and not (paired and shape[0] % 2)
        ):
            return
    check_prediction("model_pred", model_pred)
    check_device("model_pred", model_pred)
    if ref_pred is not None:
        check_like("ref_pred", ref_pred, "model_pred", model_pred)
        check_constant("ref_pred", ref_pred)
    check_like("target", target, "model_pred", model_pred)
    check_constant("target", target)
    if paired:
        check_paired("model_pred", model_pred)


def compute_dtype(model_pred, ref_pred=None, target=None, *more):
    """float64 if any input is float64, else float32 (docs/methods.md §1, "Dtypes"). ``more``:
    further tensors (or None) of a drop-in's block; the three named ones are the fast path."""
    f64 = torch.float64
    if model_pred.dtype is f64 or (target is not None and target.dtype is f64):
        return f64
    if ref_pred is not None and ref_pred.dtype is f64:
        return f64
    return f64 if more and any(t is not None and t.dtype is f64 for t in more) else torch.float32


def check_range(name, value, low, high, low_open=False):
    """A float hyperparameter in [low, high] ((low, high] with low_open)."""
    check_finite(name, value)
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_nonnegative(name, value):
    check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_aux_tensor(name, x, device, shape_text, ok_shape):
    """An extra input (embeddings, labels, timesteps): a real tensor on `device` whose shape
    passes ok_shape(shape); shape_text describes the expected shape in the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got {x.dtype}")
    if not ok_shape(tuple(x.shape)):
        raise ValueError(f"{name} must have shape {shape_text}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the device of model_pred ({device}), got {x.device}")


def check_float_tensor(name, x):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_unit_interval(name, value):
    check_range(name, value, 0.0, 1.0)


def check_open_unit_interval(name, value):
    check_range(name, value, 0.0, 1.0, low_open=True)


_CHECKS = {
    "positive_finite": check_positive_finite,
    "finite": check_finite,
    "nonnegative": check_nonnegative,
    "unit_interval": check_unit_interval,
    "open_unit_interval": check_open_unit_interval,
    "positive_int": check_positive_int,
}


def check_hyperparameters(method, values, options=None):
    """Run the checks of `method`'s descriptor (kernels/method.py) on `values` (hyperparameter
    name -> value; "bool"/"none" ones are the public function's to check), in descriptor order,
    then check each option in `options` (name -> value) against its choices. Returns the float
    hyperparameters the head reads (name -> value)."""
    for hyper in method.hypers:
        if hyper.check in _CHECKS:
            _CHECKS[hyper.check](hyper.name, values[hyper.name])
    for option in method.options:
        if option.public and options is not None and option.name in options:
            check_choice(option.name, options[option.name], option.choices)
    return {h.name: values[h.name] for h in method.hypers if h.head}
