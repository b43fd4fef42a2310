"""``--cache_latents`` (fastpref.training.latent_cache) on the bundled tiny SD model: cached
batches and steps equal the on-line ones (VAE and text encoder run per batch) to float
tolerance; the cache is rebuilt under a new name when the data or a flag changes, refused when
a file of its name does not match, and the flags it cannot honour are refused before any write."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import tiny_run, write_pairs

from fastpref import train
from fastpref.training.args import ASSETS, DEFAULT_MODEL
from fastpref.training.config import parse_config
from fastpref.training.families.sdxl import StableDiffusionXLFamily
from fastpref.training.families.wan import WanFamily
from fastpref.training.family import family_class
from fastpref.training.latent_cache import CachedEncoders, check_cache_flags

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer's device


@pytest.fixture
def data(tmp_path):
    return write_pairs(tmp_path / "pairs.parquet", [1.0, 0.0, 1.0, 0.0, 1.0])


def _run(data, **flags):
    return tiny_run(DEVICE, False, flags.pop("loss_type", "dpo"), random_crop=False, train_data_dir=str(data), **flags)


def _files(directory):
    return sorted(p.name for p in directory.glob("latents-*.safetensors"))


@pytest.mark.parametrize("loss_type", ["dpo", "kto"])
def test_cached_batches_and_steps_equal_online_encoding(data, tmp_path, loss_type):
    cache = tmp_path / "cache"
    online = _run(data, loss_type=loss_type, train_batch_size=2)
    cached = _run(data, loss_type=loss_type, train_batch_size=2, cache_latents=True, latents_cache_dir=str(cache))
    assert isinstance(cached.encoders, CachedEncoders) and len(_files(cache)) == 1
    flips = set()
    for step in range(3):  # the stream wraps past the 5 pairs: both flip variants come up
        position = step * online.per_process
        a, b = online.batch(position), cached.batch(position)
        for name in ("latents", "embeddings", "pooled"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, msg=name)
        for name in ("noise", "timesteps", "labels"):
            assert torch.equal(getattr(b, name), getattr(a, name)), name
        out_a, out_b = online.step([a]), cached.step([b])
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-4, atol=1e-6)
        for item in range(position, position + online.per_process):
            g = online.encoders.generator(item)
            torch.randint(0, 2**31 - 1, (2,), generator=g)  # load_pixels' crop draw, then its flip draw
            flips.add(bool(torch.rand((), generator=g) < 0.5))
    assert flips == {True, False}  # both cached variants were compared
    for p, q in zip(online.params, cached.params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_cache_rebuilt_when_data_or_flags_change_and_refused_when_it_does_not_match(data, tmp_path):
    cache = tmp_path / "cache"
    _run(data, cache_latents=True, latents_cache_dir=str(cache))
    first = _files(cache)
    _run(data, cache_latents=True, latents_cache_dir=str(cache))  # same data, model and flags: read, not rebuilt
    assert _files(cache) == first
    other = write_pairs(tmp_path / "other.parquet", [1.0, 0.0, 1.0, 0.0, 0.0], captions=[f"c{i}" for i in range(5)])
    _run(other, cache_latents=True, latents_cache_dir=str(cache))
    _run(data, cache_latents=True, latents_cache_dir=str(cache), no_hflip=True)
    assert len(_files(cache)) == 3 and set(first) < set(_files(cache))

    path = cache / first[0]  # a file of this run's name whose contents are another run's
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        fingerprint = f.metadata()["fingerprint"]
    save_file(tensors, str(path), metadata={"fingerprint": "0" * 64})
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="--latents_cache_dir: .* does not match"):
        _run(data, cache_latents=True, latents_cache_dir=str(cache), output_dir=str(output))
    tensors["mean"] = tensors["mean"][:, :1].contiguous()
    save_file(tensors, str(path), metadata={"fingerprint": fingerprint})
    with pytest.raises(ValueError, match="posterior shape"):
        _run(data, cache_latents=True, latents_cache_dir=str(cache), output_dir=str(output))
    assert not output.exists()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (dict(random_crop=True), "--cache_latents with --random_crop"),
        (dict(online_pairs_every=2), "--cache_latents with --online_pairs_every"),
        (dict(dataset_streaming=True), "--cache_latents with --dataset_streaming"),
    ],
)
def test_flags_the_cache_cannot_honour_are_refused(flags, match):
    config = parse_config(pretrained_model_name_or_path=str(DEFAULT_MODEL), cache_latents=True, **flags)
    with pytest.raises(ValueError, match=match):
        check_cache_flags(config, family_class(DEFAULT_MODEL))


def test_sdxl_and_a_cache_dir_without_the_flag_are_refused():
    config = parse_config(pretrained_model_name_or_path=str(DEFAULT_MODEL), cache_latents=True)
    with pytest.raises(ValueError, match="not supported for StableDiffusionXLFamily"):
        check_cache_flags(config, StableDiffusionXLFamily)
    with pytest.raises(ValueError, match="--latents_cache_dir: needs --cache_latents"):
        check_cache_flags(parse_config(latents_cache_dir="x"), family_class(DEFAULT_MODEL))


def test_a_video_model_is_refused_naming_the_flag_before_anything_is_written(tmp_path):
    """Wan: the clips are decoded and their frames sampled per step, so nothing stands for a cache."""
    config = parse_config(pretrained_model_name_or_path=str(ASSETS / "tiny-wan"), cache_latents=True)
    message = "--cache_latents: not supported for WanFamily .*video clips are not cached.*frames"
    with pytest.raises(ValueError, match=message):
        check_cache_flags(config, WanFamily)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(ASSETS / "tiny-wan"), "--cache_latents", "--output_dir", str(out)]
    with pytest.raises(ValueError, match=message):
        train.main([*argv, "--report_to", "none", "--max_train_steps", "1"])
    assert not out.exists()
