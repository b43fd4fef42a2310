"""The trainer's speed options (docs/training.md, Speed options): TF32, the SDPA back-end,
fused AdamW, channels-last UNets, FP8 linear layers (torchao), regional compilation of the
denoiser, and the step wrapper that times the compiling first step apart (``compile_s``).
``--cache_latents`` lives in ``fastpref.training.latent_cache``.

``check_speed`` refuses every unsupported combination from the flags and configuration files
alone, so ``fastpref.training.validation.validate`` calls it before anything is loaded or written; the
``apply_*`` functions then act on the loaded model.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from .args import SDPA_BACKENDS

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
# the denoiser's repeated block lists, compiled one block at a time when the model names no
# ``_repeated_blocks`` (diffusers' own regional-compilation list)
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
RECOMPILE_LIMIT = 64  # policy / reference (adapters on and off) x grad / no-grad x block shapes


def is_unet_pipeline(path: str | Path) -> bool:
    """Whether the pipeline directory ``path`` has a UNet denoiser (a ``unet`` subfolder)."""
    return (Path(path) / "unet").is_dir()


def check_speed(config, *, cuda_available: bool | None = None, capability: tuple[int, int] | None = None) -> None:
    """Refuse the speed flags of ``config`` that cannot run here: ValueError naming the flag,
    what it needs and what was found. Reads only configuration files; ``cuda_available`` and
    ``capability`` (the GPU's compute capability) default to this machine's."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if config.channels_last and not is_unet_pipeline(config.pretrained_model_name_or_path):
        raise ValueError(
            f"--channels_last: only for UNet families (a pipeline with a unet/ subfolder: SD1.5/2.x, "
            f"SDXL); {config.pretrained_model_name_or_path!r} has a transformer denoiser, whose linear "
            f"layers have no memory format to change; drop the flag"
        )
    if config.sdpa_backend in ("cudnn", "efficient") and not cuda_available:
        raise ValueError(
            f"--sdpa_backend {config.sdpa_backend}: a CUDA kernel, and this machine has no CUDA device "
            f"(on CPU: flash or math)"
        )
    if config.use_fused_adam and config.cuda_graph and not cuda_available:
        raise ValueError("--use_fused_adam with --cuda_graph: the fused capturable AdamW needs a CUDA device")
    if config.fp8:
        if importlib.util.find_spec("torchao") is None:
            raise ValueError("--fp8: needs torchao (pip install torchao), which is not installed")
        if not cuda_available:
            raise ValueError("--fp8: needs a CUDA GPU of compute capability >= 8.9, and this machine has none")
        if capability is None:
            capability = torch.cuda.get_device_capability()
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise ValueError(
                f"--fp8: needs a GPU of compute capability >= 8.9 (FP8 tensor cores: Ada, Hopper), "
                f"got {capability[0]}.{capability[1]}"
            )


def set_backends(config) -> None:
    """``--allow_tf32``: TF32 tensor cores for float32 matmuls and convolutions (process-wide,
    as diffusers' scripts set it). Off leaves PyTorch's defaults untouched."""
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sdpa_context(config):
    """The context the step runs in: ``torch.nn.attention.sdpa_kernel`` restricted to the
    ``--sdpa_backend`` kernel, or a null context (PyTorch's choice)."""
    if config.sdpa_backend is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[config.sdpa_backend])])


def fp8_filter(module: torch.nn.Module, name: str) -> bool:
    """Which ``nn.Linear`` layers torchao converts: dimensions multiples of 16 (the FP8 GEMM's
    tile), LoRA's own small adapter matrices excluded."""
    if not isinstance(module, torch.nn.Linear) or "lora_" in name:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """``--fp8``: the denoiser's linear layers as torchao ``Float8Linear`` (dynamic tensor-wise
    scaling; forward and backward GEMMs in float8). ``check_speed`` has checked torchao and the GPU."""
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=fp8_filter)
    return model


def regional_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model`` that ``--compile_denoiser`` compiles: every module whose
    class the model names in diffusers' ``_repeated_blocks`` (the UNet's ``BasicTransformerBlock``,
    Flux's double and single blocks), else every entry of its block lists (``BLOCK_LISTS``)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        for attr in BLOCK_LISTS:
            blocks.extend(getattr(model, attr, None) or ())
    return blocks


def apply_compile(model: torch.nn.Module, backend: str) -> int:
    """``--compile_denoiser``: ``torch.compile`` each of ``regional_blocks(model)`` in place
    (``nn.Module.compile``: parameter names, LoRA adapters and checkpoints are unchanged);
    returns how many blocks. Compilation itself happens at the first call."""
    blocks = regional_blocks(model)
    if not blocks:
        raise ValueError(f"--compile_denoiser: {type(model).__name__} has no repeated blocks to compile")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)  # fixed training shapes: one graph per block shape
    return len(blocks)


def prepare_denoiser(config, model: torch.nn.Module) -> torch.nn.Module:
    """The model-side speed options on ``model`` (the denoiser after LoRA, or the reference
    copy), in this order: FP8 layers, channels-last, regional compilation."""
    if config.fp8:
        apply_fp8(model)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile_denoiser:
        apply_compile(model, config.compile_backend)
    return model


class SpeedStep:
    """What the loop calls with speed options on: ``step(batches)`` inside the ``--sdpa_backend``
    context; with ``--compile_denoiser`` the first call (which compiles) is timed on the host,
    once, and every step's metrics carry it as ``compile_s`` (a device scalar made once)."""

    def __init__(self, step: Callable, config):
        self.step, self.config = step, config
        self.compile_s: torch.Tensor | None = None

    def __call__(self, batches):
        with sdpa_context(self.config):
            if not self.config.compile_denoiser:
                return self.step(batches)
            if self.compile_s is not None:
                metrics = self.step(batches)
                metrics["compile_s"] = self.compile_s
                return metrics
            start = time.perf_counter()
            metrics = self.step(batches)
            device = next(iter(metrics.values())).device if metrics else torch.device("cpu")
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # host-ok: once, to time the compiling first step
            self.compile_s = torch.tensor(time.perf_counter() - start, device=device)
            metrics["compile_s"] = self.compile_s
            return metrics


def wants_wrapper(config) -> bool:
    """Whether the loop's step needs ``SpeedStep`` (an SDPA back-end or a compiled denoiser)."""
    return config.sdpa_backend is not None or config.compile_denoiser
