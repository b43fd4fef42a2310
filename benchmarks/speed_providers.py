"""Providers of the whole-step speed sweep (``bench_train_step.py --sweep``): the diffusers
script's step as the script runs it, and fastpref's step with each trainer speed option alone
and all of them together.

- ``script``: diffusers' ``train_diffusion_dpo.py`` step: the VAE encodes the pixels and samples
  the posterior, the text encoder encodes the prompt ids, the scheduler noises, then policy
  forward, reference forward (adapters disabled, ``no_grad``), the eager diffusers loss
  (``reference_blocks.diffusers_dpo``), backward, clip 1.0, AdamW (foreach), zero_grad.
- ``fastpref``: the same on-line encoding with fastpref's fused loss, run by the trainer's
  ``TrainStep`` (``fastpref.training.run.make_step``).
- ``+<option>``: ``fastpref`` with one trainer speed option (docs/training.md, Speed options):
  ``+cache_latents`` (posterior mean/std and text embeddings precomputed: no encoder in the step),
  ``+channels_last``, ``+fused_adam``, ``+tf32``, ``+sdpa_flash`` (CUDA: flash; CPU: flash too),
  ``+compile`` (regional ``torch.compile`` of the UNet's repeated blocks), ``+cudagraph``
  (the trainer's captured step, CUDA only), ``+fp8`` (torchao, compute capability >= 8.9).
- ``full-stack``: every option above but ``+fp8`` (``+cudagraph`` only where there is CUDA).

Every option goes through the trainer's own code: the flags become a ``Config``, refused by
``fastpref.training.speed.check_speed`` exactly as ``fastpref-train`` refuses them (the refusal
is the provider's SKIP note), and the model, optimizer and step come from ``prepare_denoiser``,
``fastpref.training.run.optimizer_and_schedule`` and ``make_step``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

OPTIONS = {
    "+cache_latents": dict(cache_latents=True),
    "+channels_last": dict(channels_last=True),
    "+fused_adam": dict(use_fused_adam=True),
    "+tf32": dict(allow_tf32=True),
    "+sdpa_flash": dict(sdpa_backend="flash"),
    "+compile": dict(compile_denoiser=True),
    "+cudagraph": dict(cuda_graph=True),
    "+fp8": dict(fp8=True),
}
FULL_STACK = ("+cache_latents", "+channels_last", "+fused_adam", "+tf32", "+sdpa_flash", "+compile", "+cudagraph")
SWEEP = ("script", "fastpref", *OPTIONS, "full-stack")

# SD1.5's VAE (vae/config.json) and CLIP ViT-L/14 text encoder (text_encoder/config.json) values
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
TINY_VAE_CONFIG = dict(
    SD15_VAE_CONFIG,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
TINY_TEXT_CONFIG = dict(SD15_TEXT_CONFIG, vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2)
TINY_TEXT_CONFIG["num_attention_heads"] = 4


def option_flags(provider: str) -> dict:
    """The trainer flags of ``provider`` (``script`` and ``fastpref``: none). ``full-stack`` on
    a machine without CUDA leaves out ``+cudagraph`` (CUDA only), so it still runs there."""
    if provider == "full-stack":
        flags = {}
        for name in FULL_STACK:
            if name != "+cudagraph" or torch.cuda.is_available():
                flags.update(OPTIONS[name])
        return flags
    return dict(OPTIONS.get(provider, {}))


@dataclass
class Encoders:
    """The frozen encoders of the script's step: VAE, text encoder, DDPM schedule."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: object


def build_encoders(tiny: bool, device: str, dtype: torch.dtype) -> Encoders:
    """Random-weight SD1.5 VAE and text encoder (or their miniatures) in ``dtype``, frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD15_VAE_CONFIG))
        text = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT_CONFIG if tiny else SD15_TEXT_CONFIG)))
    for module in (vae, text):
        module.requires_grad_(False).eval().to(device=device, dtype=dtype)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return Encoders(vae, text, scheduler)


def make_inputs(enc: Encoders, unet_config: dict, B: int, device: str, dtype: torch.dtype) -> dict:
    """Random pixels ``[2B, 3, H, W]`` (winners then losers), prompt ids ``[B, 77]``, noise and
    posterior noise ``[2B, 4, h, w]`` and timesteps ``[2B]`` shared within a pair; and the cache
    of the same data: posterior mean and std ``[2B, 4, h, w]`` float32, embeddings ``[2B, 77, D]``."""
    g = torch.Generator().manual_seed(B)
    s = unet_config["sample_size"]
    factor = 2 ** (len(enc.vae.config.block_out_channels) - 1)
    pixels = (torch.rand(2 * B, 3, s * factor, s * factor, generator=g) * 2 - 1).to(device)
    ids = torch.randint(0, enc.text_encoder.config.vocab_size, (B, 77), generator=g).to(device)
    shape = (2 * B, unet_config["in_channels"], s, s)
    noise = torch.randn(shape, generator=g).to(device)
    eps = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (B,), generator=g).repeat(2).to(device)
    with torch.no_grad():
        dist = enc.vae.encode(pixels.to(dtype)).latent_dist
        emb = enc.text_encoder(ids)[0].repeat(2, 1, 1)
    return dict(online=(pixels, ids, noise, eps, t), cached=(dist.mean.float(), dist.std.float(), emb, noise, eps, t))


def _encode_online(enc: Encoders, pixels, ids, eps, dtype):
    """The script's encoding: VAE posterior sample (scaled), text embeddings for both halves."""
    with torch.no_grad():
        dist = enc.vae.encode(pixels.to(dtype)).latent_dist
        latents = (dist.mean.float() + dist.std.float() * eps) * enc.vae.config.scaling_factor
        emb = enc.text_encoder(ids)[0].repeat(2, 1, 1)
    return latents, emb


def make_loss_fn(
    unet, enc: Encoders, dtype: torch.dtype, device: str, *, cached: bool, diffusers_loss: bool, graph: bool = False
):
    """``loss_fn(batch) -> (loss, metrics)`` of one micro-batch (``make_inputs``' tuples);
    ``graph``: autocast without its weight-cast cache, as the trainer runs a captured step."""
    import reference_blocks as rb

    import fastpref
    from fastpref.training.models import adapters_disabled

    def loss_fn(batch):
        if cached:
            mean, std, emb, noise, eps, t = batch
            latents = (mean + std * eps) * enc.vae.config.scaling_factor
        else:
            pixels, ids, noise, eps, t = batch
            latents, emb = _encode_online(enc, pixels, ids, eps, dtype)
        noisy = enc.scheduler.add_noise(latents, noise, t)
        with torch.autocast(device_type=device, dtype=dtype, cache_enabled=not graph):
            model_pred = unet(noisy, t, emb).sample
            with adapters_disabled(unet), torch.no_grad():
                ref_pred = unet(noisy, t, emb).sample
        if diffusers_loss:
            return rb.diffusers_dpo(model_pred, ref_pred, noise, beta_dpo=2500.0, loss_type="sigmoid")[0], {}
        return fastpref.diffusion_dpo_loss(model_pred, ref_pred, noise, beta=5000.0)

    return loss_fn


def script_step(unet, params, enc, inputs, dtype, device):
    """The diffusers script's step (``script``), returns ``(step, eager_step)``."""
    opt = torch.optim.AdamW(params, lr=1e-8, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    loss_fn = make_loss_fn(unet, enc, dtype, device, cached=False, diffusers_loss=True)

    def step():
        loss, _ = loss_fn(inputs["online"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, step


def refusal(provider: str, compile_backend: str) -> str | None:
    """Why the trainer would refuse ``provider``'s flags here (``check_speed`` and
    ``graph_refusal``), or None."""
    return flags_refusal(option_flags(provider), compile_backend)


def flags_refusal(flags: dict, compile_backend: str) -> str | None:
    """Why the trainer would refuse the speed ``flags`` (``Config`` fields) here, or None."""
    from fastpref.training.config import parse_config
    from fastpref.training.graph import graph_refusal
    from fastpref.training.speed import check_speed

    config = parse_config(compile_backend=compile_backend, **flags)
    try:
        check_speed(config)
    except ValueError as error:
        return str(error)
    if config.cuda_graph:
        return graph_refusal(cuda_available=torch.cuda.is_available(), gradient_checkpointing=False, world_size=1)
    return None


def stack_step(unet, params, enc, inputs, dtype, device, provider: str, compile_backend: str):
    """fastpref's step with ``provider``'s options through the trainer's builders; returns
    ``(step, eager_step)`` (the captured provider's eager twin is its inner ``TrainStep``, for
    counting FLOPs). The caller has checked ``refusal``; ``unet`` is this provider's own."""
    from fastpref.training.config import parse_config
    from fastpref.training.run import make_step, optimizer_and_schedule
    from fastpref.training.speed import prepare_denoiser, set_backends

    config = parse_config(learning_rate=1e-8, compile_backend=compile_backend, **option_flags(provider))
    set_backends(config)
    prepare_denoiser(config, unet)
    opt, _ = optimizer_and_schedule(config, params)
    loss_fn = make_loss_fn(
        unet, enc, dtype, device, cached=config.cache_latents, diffusers_loss=False, graph=config.cuda_graph
    )
    inner, step = make_step(config, loss_fn, params, opt)
    batch = inputs["cached" if config.cache_latents else "online"]
    return functools.partial(step, [batch]), functools.partial(inner, [batch])


def analytic_flops(unet_forward_flops: float) -> float:
    """Model FLOPs of one preference step for MFU: policy forward + reference forward +
    backward, the backward counted as twice a forward (the dense-training convention; LoRA's
    frozen weights need no weight gradient, so the executed backward is nearer one forward).
    Encoders (VAE, text) are not model work and are not counted."""
    return unet_forward_flops * (1 + 1 + 2)
