"""The tiny ``AutoencoderKLWan`` of the bundled Wan pipeline: Wan 2.2's residual layout at toy size.

Training a video VAE from random weights takes far longer than the tiny build allows on one CPU
core (a few hundred steps left it blurring the shapes into the background), so its weights are constructed
instead (``identity_init``), in a form that a longer training could start from:

- the VAE patchifies frames 2x2 (``patch_size=2``: 12 channels at half size) and has one residual
  down block with Wan 2.2's parameter-free ``AvgDown3D`` shortcut (2x in space, 2x in time) and
  one residual up block with its ``DupUp3D`` shortcut, so spatial factor 4 and temporal factor 2;
- the encoder's input convolution averages the four patch positions of each colour (R, G, B and
  their grey mean: 4 signal channels, ``z_dim = 4``); every residual branch, attention output and
  resampling convolution starts at zero, so each block is its shortcut: the encoder averages
  each 2x2x2 block, the latent is the video's 4x4x2 box average, and the decoder repeats it back
  to every pixel of the block;
- the heads' per-pixel RMS norm sees the signal channels next to one large constant channel
  (``CONSTANT``), so it only divides by a nearly fixed number, and the SiLU after it works in its
  nearly linear range around 0 (signal scaled to ``|y| <= HEAD_SCALE``); the output convolutions
  undo both scalings. The posterior's log-variance starts at ``INIT_LOGVAR``.

The result is a blocky but faithful codec: colours and positions survive, and so does the motion
(the speed of ``fastpref.tiny.motion_reward`` read on reconstructions correlates 0.999 with the
originals'; brief fine-tuning from here made the reconstructions worse, not better).
``latent_statistics`` sets the per-channel ``latents_mean`` / ``latents_std`` that Wan's
pipeline and trainer normalise latents with.
"""

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from .motion import random_videos

Z_DIM = 4  # latent channels: the R, G and B averages and their grey mean
PATCH_CHANNELS = 12  # 3 colours x 2 x 2 patch positions (channel 4 c + k: colour c, position k)
WIDTH = 16  # base_dim: the 4 signal channels, one constant channel, 11 spare
CONSTANT = 20.0  # the constant channel's value before each head's RMS norm
HEAD_SCALE = 0.1  # |signal| after the RMS norm, for pixels in [-1, 1]
INIT_LOGVAR = -8.0


def tiny_wan_vae() -> AutoencoderKLWan:
    """The tiny VAE's architecture (random weights): ``[N, 3, F, 32, 32]`` videos, ``F = 1 + 4k``,
    to ``[N, 4, 1 + (F - 1) / 2, 8, 8]`` latents."""
    return AutoencoderKLWan(
        base_dim=WIDTH,
        z_dim=Z_DIM,
        dim_mult=[1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True],
        is_residual=True,
        patch_size=2,
        in_channels=PATCH_CHANNELS,
        out_channels=PATCH_CHANNELS,
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
        scale_factor_temporal=2,
        scale_factor_spatial=4,
    )


def _set_mixing(conv: torch.nn.Module, mixing: torch.Tensor) -> None:
    """Set a (causal) convolution to the per-pixel linear map ``mixing`` ``[out, in]`` (its first
    rows and columns) through the kernel's current-frame, centre tap; every other weight 0."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        tap = (conv.weight.shape[2] - 1,) if conv.weight.ndim == 5 else ()  # causal: the last frame tap
        centre = tuple(k // 2 for k in conv.weight.shape[-2:])
        rows, cols = mixing.shape
        conv.weight[(slice(0, rows), slice(0, cols), *tap, *centre)] = mixing


def _zero(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def identity_init(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """Overwrite ``vae``'s weights with the reconstructing construction of the module docstring."""
    average = torch.zeros(Z_DIM, PATCH_CHANNELS)  # patch channels -> R, G, B averages and grey
    for c in range(3):
        average[c, 4 * c : 4 * c + 4] = 0.25
    average[3] = 1.0 / PATCH_CHANNELS
    repeat = torch.zeros(PATCH_CHANNELS, Z_DIM)  # R, G, B back to all 4 patch positions
    for c in range(3):
        repeat[4 * c : 4 * c + 4, c] = 1.0
    gamma = HEAD_SCALE * CONSTANT / np.sqrt(WIDTH)  # norm: x / |h| * sqrt(WIDTH) * gamma, |h| ~ CONSTANT
    unscale = 1.0 / (HEAD_SCALE * 0.5)  # undoes the norm's scale and silu's slope 1/2 at 0
    for part in (vae.encoder, vae.decoder):
        for name, module in part.named_modules():
            if name.endswith("conv2") or name.endswith(".proj") or name.endswith("time_conv"):
                _zero(module)
            if name.endswith("resample") and isinstance(module, torch.nn.Sequential):
                _zero(module)
        with torch.no_grad():
            part.norm_out.gamma.fill_(gamma)
    _set_mixing(vae.encoder.conv_in, average)
    _set_mixing(vae.decoder.conv_in, torch.eye(Z_DIM))
    for conv_in in (vae.encoder.conv_in, vae.decoder.conv_in):
        with torch.no_grad():
            conv_in.bias[Z_DIM] = CONSTANT  # the constant channel
    # encoder head: mean channels = the averages; log-variance channels = INIT_LOGVAR
    _set_mixing(vae.encoder.conv_out, unscale * torch.eye(Z_DIM))
    with torch.no_grad():
        vae.encoder.conv_out.bias[Z_DIM:] = INIT_LOGVAR
    _set_mixing(vae.quant_conv, torch.eye(2 * Z_DIM))
    _set_mixing(vae.post_quant_conv, torch.eye(Z_DIM))
    _set_mixing(vae.decoder.conv_out, unscale * repeat)
    return vae


def to_pixels(videos: np.ndarray) -> torch.Tensor:
    """``[N, F, H, W, 3]`` uint8 to ``[N, 3, F, H, W]`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Inverse of ``to_pixels`` (clamped, rounded)."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, seed: int, n: int = 256) -> AutoencoderKLWan:
    """Register each latent channel's mean and standard deviation over ``n`` procedural videos'
    posterior samples as ``latents_mean`` / ``latents_std`` (what Wan normalises latents by)."""
    z = torch.cat(
        [vae.encode(to_pixels(random_videos(64, seed=seed + i)[0])).latent_dist.sample() for i in range(n // 64)]
    )
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())  # host-ok: offline build
    return vae
