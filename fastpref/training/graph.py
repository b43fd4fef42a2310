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
        return ("--cuda_graph with --gradient_checkpointing: refused, because activation checkpointing "
                "saves and restores the CUDA RNG state during backward, which a CUDA graph cannot "
                "capture; drop one of the two flags")
    if world_size > 1:
        return (f"--cuda_graph: runs on one process only (got WORLD_SIZE={world_size}); DDP's gradient "
                f"all-reduce is not captured by this step")
    return None


def make_optimizer(params: list[torch.nn.Parameter], lr: float, *, static: bool, **adamw) -> torch.optim.AdamW:
    """AdamW for the trainer. ``static``: a 0-dim tensor learning rate on the parameters' device
    (the LR scheduler fills it in place, so a captured step sees each new value), capturable on
    CUDA; elsewhere the single-tensor kernel, the CPU implementation that takes a tensor LR."""
    if not static:
        return torch.optim.AdamW(params, lr=lr, **adamw)
    device = params[0].device
    if device.type == "cuda":
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), capturable=True, **adamw)
    else:
        optimizer = torch.optim.AdamW(params, lr=torch.tensor(lr), foreach=False, **adamw)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr  # a float base LR: the scheduler computes in float64, as in the eager run
    return optimizer


def _clone(batch):
    """A copy of a micro-batch: a ``Batch`` or any tuple of tensors."""
    clones = (t.clone() for t in batch)
    return type(batch)(*clones) if hasattr(batch, "_fields") else tuple(clones)


class StaticStep:
    """A ``TrainStep`` run on static input buffers: captured in a CUDA graph after
    ``warmup_steps`` eager side-stream steps and replayed (``use_graph=True``), or called
    directly on the buffers (``use_graph=False``, any device). A micro-batch is a ``Batch`` or
    any tuple of tensors; every step must bring the same number, shapes and dtypes."""

    def __init__(self, step: TrainStep, *, use_graph: bool, capture_optimizer: bool = True,
                 warmup_steps: int = WARMUP_STEPS):
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
            raise ValueError(f"batches: expected {len(self.inputs)} micro-batches (the captured step's), "
                             f"got {len(batches)}")
        for static, batch in zip(self.inputs, batches):
            names = getattr(batch, "_fields", range(len(batch)))
            for name, buffer, value in zip(names, static, batch, strict=True):
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    raise ValueError(f"batch.{name}: expected {tuple(buffer.shape)} {buffer.dtype} "
                                     f"(the captured step's), got {tuple(value.shape)} {value.dtype}")
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
        self.graph = torch.cuda.CUDAGraph()
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
        with torch.cuda.graph(self.graph):
            outputs = self.step.forward_backward(self.inputs)
            if self.capture_optimizer:
                outputs["grad_norm"] = self.step.apply_gradients()
        self.outputs = outputs
