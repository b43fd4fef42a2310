"""Architecture-independent helpers for a diffusers denoiser: dtype casts, attention back-end,
LoRA adapters, the frozen reference copy and the tensors a checkpoint stores. diffusers and peft
are imported where used, so importing the trainer (``fastpref-train --help``) stays fast."""

import copy
import importlib.util
import warnings
from contextlib import contextmanager

import torch


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)``, skipped when every parameter already has ``dtype``."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def set_attention(model: torch.nn.Module, use_xformers: bool | None, sdpa_processor=None) -> str:
    """Memory-efficient attention; returns the back-end used, ``"xformers"`` or ``"sdpa"``.

    ``use_xformers=True`` (the diffusers flag): xformers or a ValueError. ``None`` (no flag):
    xformers when it is installed and its CUDA kernels run here (diffusers makes a test call),
    PyTorch SDPA otherwise, with a warning when an installed xformers fails. ``False``: SDPA.
    ``sdpa_processor``: the model's SDPA attention processor (default ``AttnProcessor2_0``, the
    UNet's).
    """
    installed = importlib.util.find_spec("xformers") is not None
    if use_xformers and not installed:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention: xformers is not installed "
            "(pip install xformers), drop the flag to use PyTorch SDPA attention"
        )
    if use_xformers or (use_xformers is None and installed and model.device.type == "cuda"):
        try:
            model.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as error:  # diffusers raises several types when the kernels cannot run
            if use_xformers:
                raise ValueError(
                    f"--enable_xformers_memory_efficient_attention: xformers cannot run "
                    f"here ({type(error).__name__}: {error})"
                ) from error
            warnings.warn(
                f"xformers is installed but cannot run here ({type(error).__name__}); using PyTorch SDPA attention",
                stacklevel=2,
            )
    if sdpa_processor is None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        sdpa_processor = AttnProcessor2_0()
    model.set_attn_processor(sdpa_processor)
    return "sdpa"


def add_lora(
    model: torch.nn.Module, rank: int, weight_dtype: torch.dtype, target_modules: list[str]
) -> list[torch.nn.Parameter]:
    """Freeze ``model`` (cast to ``weight_dtype``), attach float32 LoRA adapters of rank ``rank``
    (alpha = rank, gaussian init) to ``target_modules``; returns the trainable adapter parameters."""
    from peft import LoraConfig

    cast(model.requires_grad_(False), weight_dtype)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def frozen_copy(model: torch.nn.Module, weight_dtype: torch.dtype) -> torch.nn.Module:
    """A frozen reference copy of ``model`` in ``weight_dtype``."""
    return cast(copy.deepcopy(model).requires_grad_(False).eval(), weight_dtype)


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """LoRA's reference: ``model`` with its adapters off for the duration."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def trainable_state(model: torch.nn.Module, reference: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: LoRA adapter weights (peft names) or the full model."""
    if reference == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state(model: torch.nn.Module, reference: str, tensors: dict) -> None:
    """Inverse of ``trainable_state``; every stored tensor must match a parameter."""
    if reference == "lora":
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"--resume_from_checkpoint: unexpected LoRA keys {result.unexpected_keys[:4]}")
    else:
        model.load_state_dict(tensors, strict=True)


def vae_encode(
    vae, pixels: torch.Tensor, latent_eps: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[N, 3, H, W]`` pixels in [-1, 1] -> float32 latents ``(z - shift_factor) · scaling_factor``
    of the VAE posterior sample ``z = mean + std · latent_eps`` (no shift when the VAE has none),
    as every family's training script scales them; ``vae`` runs in ``dtype`` on ``device``."""
    from .family import to_device

    with torch.no_grad():
        dist = vae.encode(to_device(pixels, device).to(dtype)).latent_dist
    latents = dist.mean.float() + dist.std.float() * to_device(latent_eps, device)
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``vae_encode``: latents ``[N, C, h, w]`` -> pixels ``[N, 3, H, W]`` (roughly [-1, 1])."""
    with torch.no_grad():
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z.to(dtype)).sample
