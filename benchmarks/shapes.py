"""Benchmark shapes, dtypes and input construction.

A shape is the per-row latent shape; the batch is ``[2B, *row]`` (B winner/loser pairs).
"""

from __future__ import annotations

import math

import torch

SHAPES: dict[str, tuple[int, ...]] = {
    "sd15_256": (4, 32, 32),  # SD1.5 at 256 px
    "sd15_512": (4, 64, 64),  # SD1.5 at 512 px
    "sdxl_1024": (4, 128, 128),  # SDXL at 1024 px
    "video": (4, 16, 64, 64),  # 16-frame video latents
    "tiny": (4, 8, 8),  # CPU / interpreter only
    "tiny_video": (4, 2, 8, 8),  # CPU / interpreter only
}
GPU_SHAPES = ["sd15_256", "sd15_512", "sdxl_1024", "video"]
CPU_SHAPES = ["tiny", "tiny_video"]
BATCHES = [1, 2, 4, 8, 16, 32]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_list(spec: str | None, known, default: list) -> list:
    """Parse a comma list, checking every item is in ``known``; ``all`` means every item."""
    if spec is None:
        return list(default)
    if spec == "all":
        return list(known)
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad:
        raise SystemExit(f"unknown value(s) {bad}; known: {list(known)}")
    return items


def parse_batches(spec: str | None, default: list[int]) -> list[int]:
    """Parse ``--batches`` (comma list of ints)."""
    if spec is None:
        return list(default)
    return [int(s) for s in spec.split(",") if s.strip()]


def batch_shape(shape_name: str, B: int) -> tuple[int, ...]:
    """Full tensor shape ``[2B, *row]``."""
    return (2 * B, *SHAPES[shape_name])


def make_inputs(method, shape_name: str, B: int, dtype: torch.dtype, device, seed: int = 0):
    """Build ``(args, tensor_kwargs)`` for one call of ``method``.

    ``args[0]`` is ``model_pred`` (a leaf with ``requires_grad``); then ``ref_pred`` (if the
    method uses it), ``target`` and the method's extra positional inputs. Values mimic a
    training step: target ~ N(0, 1), predictions = target + N(0, 0.5^2) noise.
    """
    shape = batch_shape(shape_name, B)
    g = torch.Generator(device=device).manual_seed(seed)
    target = torch.randn(shape, generator=g, device=device)
    model_pred = target + 0.5 * torch.randn(shape, generator=g, device=device)
    ref_pred = target + 0.5 * torch.randn(shape, generator=g, device=device)
    target = target.to(dtype=dtype)
    model_pred = model_pred.to(dtype=dtype).requires_grad_(True)
    ref_pred = ref_pred.to(dtype=dtype)
    args = (model_pred, ref_pred, target) if method.uses_ref else (model_pred, target)
    if method.extra is not None:
        args = args + tuple(method.extra(B, device))
    tkw = method.tensor_kwargs(B, device) if method.tensor_kwargs is not None else {}
    return args, tkw


def input_bytes(shape_name: str, B: int, dtype: torch.dtype) -> int:
    """Bytes of one input tensor (``model_pred``)."""
    return math.prod(batch_shape(shape_name, B)) * torch.empty((), dtype=dtype).element_size()


def floor_bytes(method, shape_name: str, B: int, dtype: torch.dtype, mode: str) -> int | None:
    """Bytes that must move at least: every latent input read once (forward), plus the
    gradient written once (``full`` = forward+backward). ``None`` for ``backward`` alone,
    whose floor depends on what the forward saved (see README)."""
    n_in = 3 if method.uses_ref else 2
    one = input_bytes(shape_name, B, dtype)
    if mode == "forward":
        return n_in * one
    if mode == "full":
        return (n_in + 1) * one
    return None
