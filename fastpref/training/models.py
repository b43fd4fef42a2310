"""Loading the pipeline components, attention back-end, LoRA/copy reference, final weights."""

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTokenizer

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_dir(path: str | Path) -> int:
    """Validate a local Stable-Diffusion-layout directory; returns the VAE downsampling factor."""
    path = Path(path)
    missing = [s for s in PIPELINE_SUBFOLDERS if not (path / s).is_dir()]
    if not path.is_dir() or missing:
        raise ValueError(f"--pretrained_model_name_or_path: expected a local diffusers Stable Diffusion "
                         f"directory with subfolders {list(PIPELINE_SUBFOLDERS)}, got {str(path)!r}"
                         + (f" (missing {missing})" if path.is_dir() else " (not a directory)"))
    with open(path / "vae" / "config.json") as f:
        return 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def vae_sample_size(path: str | Path) -> int:
    """The image resolution the pipeline's VAE config declares."""
    with open(Path(path) / "vae" / "config.json") as f:
        return int(json.load(f)["sample_size"])


def load_components(path: str | Path, device: torch.device, weight_dtype: torch.dtype):
    """Tokenizer, frozen text encoder and VAE (in ``weight_dtype``), trainable UNet (float32),
    and the training noise scheduler of the pipeline directory ``path``."""
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).eval().to(device)
        cast(frozen, weight_dtype)
    return tokenizer, text_encoder, vae, unet.to(device), scheduler


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(dtype)``, skipped when every parameter already has ``dtype``."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def set_attention(unet: UNet2DConditionModel, use_xformers: bool | None) -> str:
    """Memory-efficient attention; returns the back-end used, ``"xformers"`` or ``"sdpa"``.

    ``use_xformers=True`` (the diffusers flag): xformers or a ValueError. ``None`` (no flag):
    xformers when it is installed and its CUDA kernels run here (diffusers makes a test call),
    PyTorch SDPA otherwise, with a warning when an installed xformers fails. ``False``: SDPA.
    """
    installed = importlib.util.find_spec("xformers") is not None
    if use_xformers and not installed:
        raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                         "(pip install xformers), drop the flag to use PyTorch SDPA attention")
    if use_xformers or (use_xformers is None and installed and unet.device.type == "cuda"):
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as error:  # diffusers raises several types when the kernels cannot run
            if use_xformers:
                raise ValueError(f"--enable_xformers_memory_efficient_attention: xformers cannot run "
                                 f"here ({type(error).__name__}: {error})") from error
            warnings.warn(f"xformers is installed but cannot run here ({type(error).__name__}); "
                          f"using PyTorch SDPA attention")
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def add_lora(unet: UNet2DConditionModel, rank: int, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Freeze the UNet (cast to ``weight_dtype``), attach float32 LoRA adapters of rank ``rank``
    to its attention projections; returns the trainable adapter parameters."""
    cast(unet.requires_grad_(False), weight_dtype)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def frozen_copy(unet: UNet2DConditionModel, weight_dtype: torch.dtype) -> UNet2DConditionModel:
    """A frozen reference copy of ``unet`` in ``weight_dtype``."""
    return cast(copy.deepcopy(unet).requires_grad_(False).eval(), weight_dtype)


def trainable_state(unet: UNet2DConditionModel, reference: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: LoRA adapter weights (peft names) or the full UNet."""
    if reference == "lora":
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_trainable_state(unet: UNet2DConditionModel, reference: str, tensors: dict) -> None:
    """Inverse of ``trainable_state``; every stored tensor must match a parameter."""
    if reference == "lora":
        result = set_peft_model_state_dict(unet, tensors)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"--resume_from_checkpoint: unexpected LoRA keys {result.unexpected_keys[:4]}")
    else:
        unet.load_state_dict(tensors, strict=True)


def save_final_weights(unet: UNet2DConditionModel, reference: str, output_dir: str | Path) -> None:
    """LoRA: ``pytorch_lora_weights.safetensors`` in the diffusers format that
    ``StableDiffusionPipeline.load_lora_weights`` reads. Copy: ``unet/`` via ``save_pretrained``."""
    if reference == "lora":
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers,
                                                  safe_serialization=True)
    else:
        unet.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)
