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

from .data import PreferencePairs, pair_indices
from .family import ModelFamily, to_device


class Batch(NamedTuple):
    """One micro-batch, all tensors on the training device; R rows (2B for paired layouts).

    latents ``[R, *latent_shape]`` float32 latents in the denoiser's space (``ModelFamily.
    encode_images``; images ``(C, h, w)``, video ``(C, F, h, w)``); embeddings ``[R, L, D]`` and
    pooled ``[R, P]`` prompt embeddings (``ModelFamily.encode_prompts``, weight dtype); noise like
    latents, float32; timesteps ``[R]`` int64 (flow families: float32); labels ``[R]`` float32
    (1 = desirable / winner, 0 = undesirable / loser); extra ``[R, E]`` float32, the family's
    extra conditioning of each row (``ModelFamily.prepare_images``: SDXL's time ids, ``E = 6``;
    ``[R, 0]`` for families without any; a pair's rows share it). None only in hand-built
    batches (read as no extra conditioning).
    """

    latents: torch.Tensor
    embeddings: torch.Tensor
    pooled: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    labels: torch.Tensor
    extra: torch.Tensor | None = None


@dataclass
class Encoders:
    """What turns stream items into a ``Batch``: the model family (its frozen encoders and
    schedule) with the data settings."""

    family: ModelFamily
    resolution: int
    random_crop: bool
    hflip: bool
    seed: int

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device (pinned, non-blocking from the host to a GPU)."""
        return to_device(t, self.family.device)

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, L, D]`` prompt embeddings and ``[N, P]`` pooled embeddings."""
        return self.family.encode_prompts(captions)

    def encode_pixels(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels in [-1, 1] -> ``[N, *latent_shape]`` float32 latents, sampled
        from the VAE posterior with the given standard-normal ``latent_eps``."""
        return self.family.encode_images(pixels, latent_eps)

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent at the training resolution."""
        return self.family.latent_shape(self.resolution)

    def generator(self, position: int) -> torch.Generator:
        """The generator of the stream item at global ``position``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + position)

    def pixels(self, images: list[bytes], generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``images`` cropped and flipped alike, and their extra conditioning ``[E]``
        (``ModelFamily.prepare_images``)."""
        return self.family.prepare_images(
            images, self.resolution, random_crop=self.random_crop, hflip=self.hflip, generator=generator
        )

    def draw_noise_and_timestep(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(self.latent_shape(), generator=generator)
        return noise, self.family.draw_timestep(generator)


def _rows_twice(t: torch.Tensor) -> torch.Tensor:
    """``t`` stacked on itself along the rows (winners' values for the losers)."""
    return t.repeat(2, *[1] * (t.ndim - 1))


def paired_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders) -> Batch:
    """``2B`` rows, winners first, for the pairs at stream ``positions``."""
    indices = pair_indices(positions[0], len(positions), len(pairs), enc.seed)
    winners, losers, captions, eps, noise, timesteps, extra = [], [], [], [], [], [], []
    for index, position in zip(indices, positions, strict=True):
        g = enc.generator(position)
        caption, winner, loser = pairs[index]
        (w, l), e = enc.pixels([winner, loser], g)
        winners.append(w)
        losers.append(l)
        extra.append(e)
        captions.append(caption)
        eps.append(torch.randn((2, *enc.latent_shape()), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
    latent_eps = torch.cat([torch.stack([e[0] for e in eps]), torch.stack([e[1] for e in eps])])
    latents = enc.encode_pixels(torch.stack(winners + losers), latent_eps)
    return _assemble(
        enc,
        latents,
        captions,
        _rows_twice(torch.stack(noise)),
        _rows_twice(torch.stack(timesteps)),
        [1.0] * len(captions) + [0.0] * len(captions),
        _rows_twice(torch.stack(extra)),
        repeat=2,
    )


def image_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders) -> Batch:
    """One row per image at stream ``positions`` of the unpaired view (KTO): own noise and
    timestep per row, label 1 for a pair's winner and 0 for its loser."""
    indices = pair_indices(positions[0], len(positions), 2 * len(pairs), enc.seed)
    pixels, captions, labels, eps, noise, timesteps, extra = [], [], [], [], [], [], []
    for index, position in zip(indices, positions, strict=True):
        g = enc.generator(position)
        caption, image, desirable = pairs.image(index)
        (p,), e = enc.pixels([image], g)
        pixels.append(p)
        extra.append(e)
        captions.append(caption)
        labels.append(1.0 if desirable else 0.0)
        eps.append(torch.randn(enc.latent_shape(), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
    latents = enc.encode_pixels(torch.stack(pixels), torch.stack(eps))
    return _assemble(enc, latents, captions, torch.stack(noise), torch.stack(timesteps), labels, torch.stack(extra))


def winner_batch(pairs: PreferencePairs, positions: list[int], enc: Encoders, sample_losers) -> Batch:
    """SSPO: ``2B`` rows, the dataset winners first, then ``sample_losers(batch_so_far,
    start_noise, latent_eps)``'s ``[B, C, h, w]`` latents (self-samples for the same prompts,
    sampled and trained with the winners' extra conditioning)."""
    indices = pair_indices(positions[0], len(positions), len(pairs), enc.seed)
    winners, captions, eps, noise, timesteps, start, sample_eps, extra = [], [], [], [], [], [], [], []
    for index, position in zip(indices, positions, strict=True):
        g = enc.generator(position)
        caption, winner, _ = pairs[index]
        (w,), e = enc.pixels([winner], g)
        winners.append(w)
        extra.append(e)
        captions.append(caption)
        eps.append(torch.randn(enc.latent_shape(), generator=g))
        n, t = enc.draw_noise_and_timestep(g)
        noise.append(n)
        timesteps.append(t)
        start.append(torch.randn(enc.latent_shape(), generator=g))
        sample_eps.append(torch.randn(enc.latent_shape(), generator=g))
    winner_latents = enc.encode_pixels(torch.stack(winners), torch.stack(eps))
    half = _assemble(
        enc,
        winner_latents,
        captions,
        torch.stack(noise),
        torch.stack(timesteps),
        [1.0] * len(captions),
        torch.stack(extra),
    )
    losers = sample_losers(half, enc.to_device(torch.stack(start)), torch.stack(sample_eps))
    return Batch(
        torch.cat([half.latents, losers]),
        _rows_twice(half.embeddings),
        _rows_twice(half.pooled),
        _rows_twice(half.noise),
        _rows_twice(half.timesteps),
        torch.cat([half.labels, torch.zeros_like(half.labels)]),
        _rows_twice(half.extra),
    )


def _assemble(enc: Encoders, latents, captions, noise, timesteps, labels, extra, repeat: int = 1) -> Batch:
    embeddings, pooled = enc.encode_prompts(captions)  # once per prompt, then repeated per row
    if repeat == 2:
        embeddings, pooled = _rows_twice(embeddings), _rows_twice(pooled)
    return Batch(
        latents,
        embeddings,
        pooled,
        enc.to_device(noise),
        enc.to_device(timesteps),
        enc.to_device(torch.tensor(labels, dtype=torch.float32)),
        enc.to_device(extra.to(torch.float32)),
    )


LAYOUTS = {"pairs": paired_batch, "images": image_batch, "winners": winner_batch}
