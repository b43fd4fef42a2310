"""``--cache_latents``: the VAE posterior of every training image and the text embeddings of
every caption computed once at start into one safetensors file, so that a step runs no encoder.

What is cached, per call of the layouts' ``Encoders.pixels`` (a pair's two images, or one image;
a pair's images are resized to the first one's size, so an image is cached with its call): the
posterior mean and standard deviation (float32, ``[*latent_shape]`` each) of each image, once
unflipped and once flipped (``--no_hflip``: unflipped only); per unique caption the embeddings
``[L, D]`` and pooled ``[P]`` in the weight dtype. A cached batch draws exactly the random
numbers of an on-line one (crop offsets, flip, posterior noise, diffusion noise and timestep)
from the same per-item generator and forms the latents by the same float32 ops as
``models.vae_encode`` (``(mean + std · eps - shift) · scale``), so cached and on-line batches
agree to the VAE's batch-size rounding (bit for bit where it has none). Random crops are not
cached (one variant per offset would be one per pixel): ``--random_crop`` is refused.

The file is ``<dir>/latents-<fingerprint>.safetensors``, the fingerprint a SHA-256 of the data
(every caption and image's SHA-1, in order), the model (the bytes of every file of the pipeline
but its denoiser and scheduler), the family, resolution, flip setting, weight dtype and batch
layout. A change of any of them names another file, which is built (the old one is left); a
file whose name matches but whose contents do not (another version, a truncated write) is
refused. Files are written to a temporary name and renamed into place (atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batches import Encoders
from .family import ModelFamily, to_device

CACHE_VERSION = 1
CHUNK = 16  # images or captions per encoder call while building
SKIPPED_SUBFOLDERS = ("unet", "transformer", "scheduler")  # do not change latents or embeddings


def check_cache_flags(config, family_cls: type[ModelFamily]) -> None:
    """Refuse ``--cache_latents`` where the cache cannot stand for on-line encoding: ValueError
    naming the flags. Reads no file."""
    if not config.cache_latents:
        if config.latents_cache_dir is not None:
            raise ValueError(f"--latents_cache_dir: needs --cache_latents, got {config.latents_cache_dir!r} without it")
        return
    if config.random_crop:
        raise ValueError(
            "--cache_latents with --random_crop: refused, a cache holds one crop per image (the "
            "centre one; flips are cached per variant); drop one of the two flags"
        )
    if config.online_pairs_every is not None:
        raise ValueError(
            "--cache_latents with --online_pairs_every: refused, on-line pairs change the data each refresh"
        )
    if config.dataset_streaming:
        raise ValueError(
            "--cache_latents with --dataset_streaming: refused, the cache is built over the whole data set"
        )
    if family_cls.media == "videos":
        raise ValueError(
            f"--cache_latents: not supported for {family_cls.__name__} (a video model): video clips are "
            f"not cached, each step decodes its clips and samples their frames anew; drop --cache_latents"
        )
    if family_cls.prepare_images is not ModelFamily.prepare_images:
        raise ValueError(
            f"--cache_latents: not supported for {family_cls.__name__} (its images carry extra "
            f"conditioning that depends on the crop and flip draw, not cached yet); drop the flag"
        )


def _digest(data: bytes | str) -> bytes:
    return hashlib.sha1(data.encode() if isinstance(data, str) else bytes(data)).digest()


def model_digest(path: str | Path) -> str:
    """SHA-256 of every file of the pipeline directory ``path`` but the denoiser's and the
    scheduler's (relative names and bytes, in sorted order)."""
    h = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if rel.parts[0] in SKIPPED_SUBFOLDERS:
            continue
        h.update(str(rel).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def calls_of(pairs, layout: str) -> list[tuple[str, list[bytes]]]:
    """Every ``(caption, images)`` call the batch ``layout`` makes of ``Encoders.pixels`` over
    the data set: a pair's winner and loser (``pairs``), each image alone (``images``, KTO), the
    winner alone (``winners``, SSPO)."""
    calls = []
    for index in range(len(pairs)):
        caption, winner, loser = pairs[index]
        if layout == "pairs":
            calls.append((caption, [winner, loser]))
        elif layout == "images":
            calls.extend([(caption, [winner]), (caption, [loser])])
        else:
            calls.append((caption, [winner]))
    return calls


def call_key(images: list[bytes]) -> bytes:
    """The cache key of one ``Encoders.pixels`` call: SHA-1 of its images' SHA-1s."""
    return hashlib.sha1(b"".join(_digest(i) for i in images)).digest()


def fingerprint(config, family: ModelFamily, calls: list[tuple[str, list[bytes]]], layout: str) -> str:
    """The hex SHA-256 naming the cache of this data, model and these flags."""
    h = hashlib.sha256()
    settings = dict(
        version=CACHE_VERSION,
        family=type(family).__name__,
        resolution=config.resolution,
        hflip=not config.no_hflip,
        dtype=str(family.weight_dtype),
        layout=layout,
        model=model_digest(config.pretrained_model_name_or_path),
    )
    h.update(json.dumps(settings, sort_keys=True).encode())
    for caption, images in calls:
        h.update(_digest(caption) + call_key(images))
    return h.hexdigest()


def cache_path(config, fp: str) -> Path:
    """``<--latents_cache_dir or <output_dir>/latents_cache>/latents-<fingerprint[:32]>.safetensors``."""
    root = Path(config.latents_cache_dir or Path(config.output_dir) / "latents_cache")
    return root / f"latents-{fp[:32]}.safetensors"


def _posterior(family: ModelFamily, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 host ``(mean, std)`` ``[N, *latent_shape]`` of the VAE posterior of ``pixels``,
    as ``models.vae_encode`` computes them."""
    with torch.no_grad():
        dist = family.vae.encode(to_device(pixels, family.device).to(family.weight_dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def build_cache(config, family: ModelFamily, calls, fp: str) -> dict[str, torch.Tensor]:
    """Encode every call's images (both flip variants) and every unique caption; returns the
    tensors of the cache file."""
    variants = 1 if config.no_hflip else 2
    keys, starts, pixels = [], [], []
    seen = {}
    for _, images in calls:
        key = call_key(images)
        if key in seen:
            continue
        seen[key] = len(keys)
        keys.append(torch.frombuffer(bytearray(key), dtype=torch.uint8))
        starts.append(len(pixels))
        got, _ = family.prepare_images(
            images, config.resolution, random_crop=False, hflip=False, generator=torch.Generator().manual_seed(0)
        )
        pixels.extend(got)
    means, stds = [], []
    for start in range(0, len(pixels), CHUNK):
        chunk = torch.stack(pixels[start : start + CHUNK])
        mean, std = zip(*(_posterior(family, chunk.flip(-1) if v else chunk) for v in range(variants)), strict=True)
        means.append(torch.stack(mean, 1))
        stds.append(torch.stack(std, 1))
    captions = list(dict.fromkeys(caption for caption, _ in calls))
    embeddings, pooled = [], []
    for start in range(0, len(captions), CHUNK):
        emb, pool = family.encode_prompts(captions[start : start + CHUNK])
        embeddings.append(emb.cpu())
        pooled.append(pool.cpu())
    return {
        "call_keys": torch.stack(keys),
        "call_starts": torch.tensor(starts, dtype=torch.int64),
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "caption_keys": torch.stack([torch.frombuffer(bytearray(_digest(c)), dtype=torch.uint8) for c in captions]),
        "embeddings": torch.cat(embeddings),
        "pooled": torch.cat(pooled),
    }


def write_cache(path: Path, tensors: dict[str, torch.Tensor], fp: str) -> None:
    """``tensors`` to ``path`` atomically (a temporary file in the same directory, renamed)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fp})
    os.replace(tmp, path)


def read_cache(path: Path, fp: str, latent_shape: tuple[int, ...], variants: int) -> dict[str, torch.Tensor]:
    """The tensors of the cache file ``path``; ValueError naming ``--latents_cache_dir`` when it
    is not this run's (fingerprint, tensors or shapes)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    def refuse(why: str):
        return ValueError(
            f"--latents_cache_dir: {str(path)!r} does not match this run's data, model and flags ({why}); "
            f"delete it to rebuild"
        )

    try:
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises several types on a damaged file
        raise refuse(f"unreadable: {type(error).__name__}: {error}") from error
    if stored != fp:
        raise refuse(f"fingerprint {stored!r}, expected {fp!r}")
    names = {"call_keys", "call_starts", "mean", "std", "caption_keys", "embeddings", "pooled"}
    if set(tensors) != names:
        raise refuse(f"tensors {sorted(tensors)}, expected {sorted(names)}")
    expected = (variants, *latent_shape)
    if tuple(tensors["mean"].shape[1:]) != expected or tensors["std"].shape != tensors["mean"].shape:
        raise refuse(f"posterior shape {tuple(tensors['mean'].shape[1:])}, expected {expected}")
    return tensors


@dataclass
class CachedEncoders(Encoders):
    """``Encoders`` whose ``pixels`` returns each image's cached posterior (``[2C, *spatial]``:
    mean then std, the drawn flip variant), ``encode_pixels`` samples it with the given noise and
    ``encode_prompts`` looks the captions up; the layouts (``fastpref.training.batches``) run
    unchanged and draw the same random numbers."""

    tensors: dict  # ``build_cache``'s
    calls: dict = field(init=False)
    captions: dict = field(init=False)

    def __post_init__(self):
        keys = self.tensors["call_keys"]
        self.calls = {bytes(keys[i].tolist()): int(s) for i, s in enumerate(self.tensors["call_starts"])}  # host-ok
        ckeys = self.tensors["caption_keys"]
        self.captions = {bytes(ckeys[i].tolist()): i for i in range(len(ckeys))}  # host-ok: start-up
        self.embeddings = to_device(self.tensors["embeddings"], self.family.device)
        self.pooled = to_device(self.tensors["pooled"], self.family.device)

    def pixels(self, images: list[bytes], generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
        torch.randint(0, 2**31 - 1, (2,), generator=generator)  # the crop draw of data.load_pixels (centre crops)
        flip = bool(torch.rand((), generator=generator) < 0.5) and self.hflip  # host-ok: CPU generator, data
        start = self.calls.get(call_key(images))
        if start is None:
            raise ValueError("--cache_latents: an image of the data stream is not in the cache (the data changed?)")
        variant = 1 if flip else 0
        mean, std = self.tensors["mean"], self.tensors["std"]
        return [
            torch.cat([mean[start + i, variant], std[start + i, variant]]) for i in range(len(images))
        ], torch.zeros(0)

    def encode_pixels(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``[N, 2C, *spatial]`` cached posteriors -> ``[N, C, *spatial]`` float32 latents, the
        ops of ``models.vae_encode`` after its VAE call."""
        pixels = to_device(pixels, self.family.device)
        mean, std = pixels.chunk(2, dim=1)
        latents = mean + std * to_device(latent_eps, self.family.device)
        config = self.family.vae.config
        return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            rows = torch.tensor([self.captions[_digest(c)] for c in captions], device=self.embeddings.device)
        except KeyError:
            raise ValueError("--cache_latents: a caption of the data stream is not in the cache") from None
        return self.embeddings[rows], self.pooled[rows]


def cached_encoders(config, encoders: Encoders, pairs, layout: str, *, is_main: bool = True, barrier=None):
    """``encoders`` backed by this run's cache, built (rank 0, the others wait at ``barrier``)
    when absent and read otherwise; returns the ``CachedEncoders`` and the cache file."""
    family = encoders.family
    calls = calls_of(pairs, layout)
    fp = fingerprint(config, family, calls, layout)
    path = cache_path(config, fp)
    if is_main and not path.exists():
        write_cache(path, build_cache(config, family, calls, fp), fp)
    if barrier is not None:
        barrier()
    variants = 1 if config.no_hflip else 2
    tensors = read_cache(path, fp, encoders.latent_shape(), variants)
    cached = CachedEncoders(
        encoders.family, encoders.resolution, encoders.random_crop, encoders.hflip, encoders.seed, tensors
    )
    return cached, path
