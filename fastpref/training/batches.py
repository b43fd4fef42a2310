"""Micro-batches of the trainer: pixels -> VAE latents, prompts -> text embeddings, and the
per-row diffusion noise and timesteps.

Every random draw of a stream item (crop, flip, VAE latent sample, noise, timestep, the SSPO
sampler's start noise) comes from a generator seeded by the item's position in the data
stream, so a run is independent of the process count and resumes exactly.

Three layouts, picked by the loss type's ``data`` field:

- ``pairs``: rows ``0..B-1`` winners, ``B..2B-1`` their losers; a pair shares noise, timestep
  and prompt (DPO and its kin).
- ``images``: every Pick-a-Pic image is its own row with its own noise and timestep, labelled
  desirable when it won its pair (KTO). The stream runs over images instead of pairs.
- ``winners``: only the winners are read; the loser slot is filled later by the SSPO sampler.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .data import PreferencePairs, load_pixels, pair_indices


class Batch(NamedTuple):
    """One micro-batch, all tensors on the training device; R rows (2B for paired layouts).

    latents ``[R, C, h, w]`` float32 scaled VAE latents; embeddings ``[R, L, D]`` and pooled
    ``[R, D]`` text-encoder outputs (weight dtype); noise ``[R, C, h, w]`` float32; timesteps
    ``[R]`` int64; labels ``[R]`` float32 (1 = desirable / winner, 0 = undesirable / loser).
    """

    latents: torch.Tensor
    embeddings: torch.Tensor
    pooled: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    labels: torch.Tensor


@dataclass
class Encoders:
    """The frozen parts that turn stream items into a ``Batch``, with the data settings."""

    vae: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module
    num_train_timesteps: int
    device: torch.device
    weight_dtype: torch.dtype
    resolution: int
    random_crop: bool
    hflip: bool
    seed: int

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device. A host tensor goes to a GPU through pinned memory
        without blocking the host, which can then prepare the next batch during the step."""
        if t.device.type != "cpu" or self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, L, D]`` last hidden states and ``[N, D]`` pooled outputs of the text encoder."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        ids = self.to_device(ids)
        with torch.no_grad():
            out = self.text_encoder(ids)
        return out[0], out[1]

    def encode_pixels(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels in [-1, 1] -> ``[N, C, h, w]`` float32 scaled latents, sampled
        from the VAE posterior with the given standard-normal ``latent_eps``."""
        with torch.no_grad():
            dist = self.vae.encode(self.to_device(pixels).to(self.weight_dtype)).latent_dist
        latents = dist.mean.float() + dist.std.float() * self.to_device(latent_eps)
        return latents * self.vae.config.scaling_factor

    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent at the training resolution."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.resolution // factor
        return self.vae.config.latent_channels, size, size

    def generator(self, position: int) -> torch.Generator:
        """The generator of the stream item at global ``position``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + position)

    def pixels(self, images: list[bytes], generator: torch.Generator) -> list[torch.Tensor]:
        return load_pixels(images, self.resolution, random_crop=self.random_crop, hflip=self.hflip,
                           generator=generator)

    def draw_noise_and_timestep(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(self.latent_shape(), generator=generator),
                torch.randint(0, self.num_train_timesteps, (), generator=generator))


def stream_length(pairs: PreferencePairs, layout: str) -> int:
    """How many stream items one epoch has: images for ``images``, pairs otherwise."""
    return 2 * len(pairs) if layout == "images" else len(pairs)


def paired_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders) -> Batch:
    """``2B`` rows, winners first, for the pairs at stream ``positions``."""
    indices = pair_indices(positions[0], len(positions), len(pairs), enc.seed)
    winners, losers, captions, eps, noise, timesteps = [], [], [], [], [], []
    for index, position in zip(indices, positions):
        g = enc.generator(position)
        caption, winner, loser = pairs[index]
        w, l = enc.pixels([winner, loser], g)
        winners.append(w)
        losers.append(l)
        captions.append(caption)
        eps.append(torch.randn((2, *enc.latent_shape()), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
    latent_eps = torch.cat([torch.stack([e[0] for e in eps]), torch.stack([e[1] for e in eps])])
    latents = enc.encode_pixels(torch.stack(winners + losers), latent_eps)
    return _assemble(enc, latents, captions, torch.stack(noise).repeat(2, 1, 1, 1),
                     torch.stack(timesteps).repeat(2), [1.0] * len(captions) + [0.0] * len(captions),
                     repeat=2)


def image_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders) -> Batch:
    """One row per image at stream ``positions`` of the unpaired view (KTO): own noise and
    timestep per row, label 1 for a pair's winner and 0 for its loser."""
    indices = pair_indices(positions[0], len(positions), 2 * len(pairs), enc.seed)
    pixels, captions, labels, eps, noise, timesteps = [], [], [], [], [], []
    for index, position in zip(indices, positions):
        g = enc.generator(position)
        caption, image, desirable = pairs.image(index)
        pixels.extend(enc.pixels([image], g))
        captions.append(caption)
        labels.append(1.0 if desirable else 0.0)
        eps.append(torch.randn(enc.latent_shape(), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
    latents = enc.encode_pixels(torch.stack(pixels), torch.stack(eps))
    return _assemble(enc, latents, captions, torch.stack(noise), torch.stack(timesteps), labels)


def winner_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders,
                 sample_losers) -> Batch:
    """SSPO: ``2B`` rows, the dataset winners first, then ``sample_losers(batch_so_far,
    start_noise, latent_eps)``'s ``[B, C, h, w]`` latents (self-samples for the same prompts)."""
    indices = pair_indices(positions[0], len(positions), len(pairs), enc.seed)
    winners, captions, eps, noise, timesteps, start, sample_eps = [], [], [], [], [], [], []
    for index, position in zip(indices, positions):
        g = enc.generator(position)
        caption, winner, _ = pairs[index]
        winners.extend(enc.pixels([winner], g))
        captions.append(caption)
        eps.append(torch.randn(enc.latent_shape(), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
        start.append(torch.randn(enc.latent_shape(), generator=g))
        sample_eps.append(torch.randn(enc.latent_shape(), generator=g))
    winner_latents = enc.encode_pixels(torch.stack(winners), torch.stack(eps))
    half = _assemble(enc, winner_latents, captions, torch.stack(noise), torch.stack(timesteps),
                     [1.0] * len(captions))
    losers = sample_losers(half, enc.to_device(torch.stack(start)), torch.stack(sample_eps))
    return Batch(torch.cat([half.latents, losers]), half.embeddings.repeat(2, 1, 1), half.pooled.repeat(2, 1),
                 half.noise.repeat(2, 1, 1, 1), half.timesteps.repeat(2),
                 torch.cat([half.labels, torch.zeros_like(half.labels)]))


def _assemble(enc: Encoders, latents, captions, noise, timesteps, labels, repeat: int = 1) -> Batch:
    embeddings, pooled = enc.encode_prompts(captions)  # once per prompt, then repeated per row
    embeddings, pooled = embeddings.repeat(repeat, 1, 1), pooled.repeat(repeat, 1)
    return Batch(latents, embeddings, pooled, enc.to_device(noise), enc.to_device(timesteps),
                 enc.to_device(torch.tensor(labels, dtype=torch.float32)))


LAYOUTS = {"pairs": paired_batch, "images": image_batch, "winners": winner_batch}
