"""``--cuda_graph``: the whole ``TrainStep`` captured once in a CUDA graph and replayed.

Recipe (PyTorch's whole-network capture): the first ``warmup_steps`` steps run eagerly on a
side stream, as real training steps, so lazily created state (optimizer moments, the grad
scaler, cuBLAS workspaces) exists before capture. The next step copies its micro-batches into
static input buffers allocated once, captures the step on them (capture runs nothing), and
every step from then on copies its inputs in and replays. Outputs (metrics, grad_norm) are
static tensors overwritten by each replay; read them on the host at logging steps only.

The optimizer must be ``AdamW(capturable=True)`` with a tensor learning rate that the LR
scheduler updates in place (``make_optimizer``). With fp16 only forward and backward are
captured; unscaling, clipping and the scaler's step (which reads found-inf on the host) run
eagerly after each replay. ``StaticStep(..., use_graph=False)`` runs the same static-buffer
path without capture: what the CPU tests check against the regular step.
"""

from __future__ import annotations

import torch

from .step import TrainStep

WARMUP_STEPS = 3


def graph_refusal(*, cuda_available: bool, gradient_checkpointing: bool, world_size: int) -> str | None:
    """Why ``--cuda_graph`` cannot run with these settings (None when it can)."""
    if not cuda_available:
        return "--cuda_graph: needs a CUDA device, and this machine has none (torch.cuda.is_available() is False)"
    if gradient_checkpointing:
        return (
            "--cuda_graph with --gradient_checkpointing: refused, because activation checkpointing "
            "saves and restores the CUDA RNG state during backward, which a CUDA graph cannot "
            "capture; drop one of the two flags"
        )
    if world_size > 1:
        return (
            f"--cuda_graph: runs on one process only (got WORLD_SIZE={world_size}); DDP's gradient "
            f"all-reduce is not captured by this step"
        )
    return None


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, *, static: bool, fused: bool = False, **adamw
) -> torch.optim.AdamW:
    """AdamW for the trainer. ``static``: a 0-dim tensor learning rate on the parameters' device
    (the LR scheduler fills it in place, so a captured step sees each new value), capturable on
    CUDA; elsewhere the single-tensor kernel, the CPU implementation that takes a tensor LR.
    The base LRs a scheduler reads (``initial_lr``, ``defaults["lr"]``) stay Python floats, so
    every schedule computes the float LR of the regular optimizer and only the value stored in
    the tensor is rounded (to float32). ``fused`` (``--use_fused_adam``): PyTorch's fused kernel
    (one launch for all parameters; on CUDA also capturable, on CPU the fused CPU kernel)."""
    if fused:
        adamw["fused"] = True
    if not static:
        return torch.optim.AdamW(params, lr=lr, **adamw)
    device = params[0].device
    if device.type == "cuda":
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), capturable=True, **adamw)
    else:
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(lr), **({"foreach": False} | adamw))
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # a float base LR: the scheduler computes in float64, as in the eager run
    # ``defaults["lr"]`` is the very tensor the scheduler refills (``add_param_group`` put it in the
    # group); diffusers' polynomial schedule reads it as its fixed initial LR, so keep a float copy
    optimizer.defaults["lr"] = lr
    return optimizer


def check_capturable_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse to capture an optimizer step that would not replay correctly (call it after the
    warm-up, before the gradients are dropped for capture). The warm-up must have run the
    optimizer: some parameter has state, and every parameter holding a gradient has its own
    (moments and step count): state created inside the graph would be re-zeroed by every
    replay, each one a first Adam step. Every group must be
    ``capturable`` (step counts and bias corrections on the device, no host read), and each
    step count must live on its parameter's device. Raises RuntimeError naming the group and
    parameter; reads no tensor value."""
    params = [(g, i, p) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])]
    has_state = [bool(optimizer.state.get(p)) for _, _, p in params]
    missing = [
        (g, i, p)
        for (g, i, p), state in zip(params, has_state, strict=True)
        if not state and (p.grad is not None or not any(has_state))
    ]
    if missing:
        g, i, p = missing[0]
        raise RuntimeError(
            f"--cuda_graph: the optimizer has no state for {len(missing)} of its {len(params)} parameters "
            f"(first: param_groups[{g}] parameter {i}, shape {tuple(p.shape)}) before capture: the eager "
            f"warm-up steps did not run the optimizer on them (warmup_steps must be >= 1); moments created "
            f"inside the graph would be zeroed again by every replay"
        )
    for g, group in enumerate(optimizer.param_groups):
        if not group.get("capturable", False):
            raise RuntimeError(
                f"--cuda_graph: param_groups[{g}] has capturable={group.get('capturable')!r}; a captured "
                f"AdamW must be built capturable (make_optimizer(..., static=True) on CUDA) and stay so "
                f"after load_state_dict"
            )
    for g, i, p in params:
        step = optimizer.state[p].get("step") if optimizer.state.get(p) else None
        if torch.is_tensor(step) and step.device != p.device:
            raise RuntimeError(
                f"--cuda_graph: the step count of param_groups[{g}] parameter {i} is on {step.device}, its "
                f"parameter on {p.device}; a captured AdamW keeps its step counts on the parameters' device"
            )


def _clone(batch):
    """A copy of a micro-batch: a ``Batch`` or any tuple of tensors (a None field, such as a
    hand-built ``Batch``'s absent ``extra``, stays None)."""
    clones = (None if t is None else t.clone() for t in batch)
    return type(batch)(*clones) if hasattr(batch, "_fields") else tuple(clones)


class StaticStep:
    """A ``TrainStep`` run on static input buffers: captured in a CUDA graph after
    ``warmup_steps`` eager side-stream steps and replayed (``use_graph=True``), or called
    directly on the buffers (``use_graph=False``, any device). A micro-batch is a ``Batch`` or
    any tuple of tensors; every step must bring the same number, shapes and dtypes."""

    def __init__(
        self, step: TrainStep, *, use_graph: bool, capture_optimizer: bool = True, warmup_steps: int = WARMUP_STEPS
    ):
        self.step, self.use_graph, self.capture_optimizer = step, use_graph, capture_optimizer
        self.warmup_left = warmup_steps if use_graph else 0
        self.inputs: list[tuple] | None = None
        self.outputs: dict[str, torch.Tensor] | None = None
        self.graph = None
        self.side_stream = None  # one stream for every warm-up step, as in PyTorch's recipe

    def __call__(self, batches: list[tuple]) -> dict[str, torch.Tensor]:
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._side_stream(batches)
        if self.inputs is None:
            self.inputs = [_clone(batch) for batch in batches]
        self._load(batches)
        if not self.use_graph:
            return self.step(self.inputs)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        out = dict(self.outputs)
        if not self.capture_optimizer:
            out["grad_norm"] = self.step.apply_gradients()
        return out

    def _load(self, batches: list[tuple]) -> None:
        if len(batches) != len(self.inputs):
            raise ValueError(
                f"batches: expected {len(self.inputs)} micro-batches (the captured step's), got {len(batches)}"
            )
        for static, batch in zip(self.inputs, batches, strict=True):
            names = getattr(batch, "_fields", range(len(batch)))
            for name, buffer, value in zip(names, static, batch, strict=True):
                if buffer is None or value is None:  # an absent field (Batch.extra): absent in every step
                    if buffer is not value:
                        raise ValueError(
                            f"batch.{name}: expected {'None' if buffer is None else 'a tensor'} "
                            f"(the captured step's), got {'None' if value is None else 'a tensor'}"
                        )
                    continue
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    raise ValueError(
                        f"batch.{name}: expected {tuple(buffer.shape)} {buffer.dtype} "
                        f"(the captured step's), got {tuple(value.shape)} {value.dtype}"
                    )
                buffer.copy_(value, non_blocking=True)

    def _side_stream(self, batches: list[tuple]) -> dict[str, torch.Tensor]:
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        side = self.side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(batches)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> None:
        if self.capture_optimizer:  # fp16 runs the optimizer eagerly after each replay
            check_capturable_optimizer(self.step.optimizer)
        self.graph = torch.cuda.CUDAGraph()
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        with torch.cuda.graph(self.graph):
            outputs = self.step.forward_backward(self.inputs)
            if self.capture_optimizer:
                outputs["grad_norm"] = self.step.apply_gradients()
        self.outputs = outputs
