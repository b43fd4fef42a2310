"""Extra per-row conditioning (``Batch.extra``, ``ModelFamily.prepare_images``, ``denoise(...,
extra)``): built once per stream item and shared by a pair's rows, handed to the policy and
reference forwards, copied into the static buffers of the ``--cuda_graph`` step, and given to the
SSPO self-sampler only by families that have some. Families without any get ``[R, 0]``."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch

from fastpref.training.args import DEFAULT_DATA, DEFAULT_MODEL
from fastpref.training.batches import Batch, Encoders, image_batch, paired_batch, winner_batch
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.families.stable_diffusion import StableDiffusionFamily
from fastpref.training.family import load_family
from fastpref.training.graph import StaticStep, _clone, make_optimizer
from fastpref.training.replay import self_sampler
from fastpref.training.step import TrainStep, preference_loss

E = 3  # the toy family's extra width


class _ExtraToy(StableDiffusionFamily):
    """The SD family with a 3-wide extra per stream item drawn from the item's generator (after
    the crop and flip), which ``denoise`` adds to the prediction, so it changes the loss."""

    class_names = ("ToyExtraPipeline",)

    def prepare_images(self, images, resolution, *, random_crop, hflip, generator):
        pixels, none = super().prepare_images(
            images, resolution, random_crop=random_crop, hflip=hflip, generator=generator
        )
        assert none.shape == (0,)
        return pixels, torch.rand(E, generator=generator) * 100

    def denoise(self, model, noisy, timesteps, embeddings, pooled, extra=None):
        out = super().denoise(model, noisy, timesteps, embeddings, pooled)
        return out + 1e-3 * extra.sum(-1).view(-1, 1, 1, 1).to(out.dtype)


@pytest.fixture(scope="module")
def families():
    sd = load_family(DEFAULT_MODEL, torch.device("cpu"), torch.float32)
    toy = _ExtraToy(sd.tokenizer, sd.text_encoder, sd.vae, sd.denoiser, sd.scheduler, sd.device, sd.weight_dtype)
    return sd, toy


@pytest.fixture(scope="module")
def pairs():
    return PreferencePairs(parquet_files(DEFAULT_DATA))


def _sampler(seen):
    def sample_losers(half, start, latent_eps):
        seen.append(half)
        return torch.randn_like(half.latents)

    return sample_losers


def test_families_without_extra_conditioning_get_an_empty_one(families, pairs):
    sd, _ = families
    enc = Encoders(sd, 32, True, True, 5)
    seen = []
    for batch, rows in (
        (paired_batch(pairs, [0, 1, 2], enc), 6),
        (image_batch(pairs, [0, 1, 2], enc), 3),
        (winner_batch(pairs, [0, 1], enc, _sampler(seen)), 4),
    ):
        assert batch.extra.shape == (rows, 0) and batch.extra.dtype == torch.float32
    assert seen[0].extra.shape == (2, 0)
    # the default prepare_images is load_pixels: the SD batches are what they were before Batch.extra
    from fastpref.training.data import load_pixels

    g1, g2 = enc.generator(7), enc.generator(7)
    winner, loser = pairs[3][1:]
    expected = load_pixels([winner, loser], 32, random_crop=True, hflip=True, generator=g1)
    got, extra = sd.prepare_images([winner, loser], 32, random_crop=True, hflip=True, generator=g2)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)) and extra.numel() == 0
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))  # same draws consumed


def test_extra_is_per_stream_item_and_shared_by_a_pair(families, pairs):
    _, toy = families
    enc = Encoders(toy, 32, True, True, 5)
    batch = paired_batch(pairs, [4, 5, 6], enc)
    assert batch.extra.shape == (6, E) and batch.extra.dtype == torch.float32
    assert torch.equal(batch.extra[:3], batch.extra[3:])  # winner and loser rows share their pair's
    assert len({tuple(r.tolist()) for r in batch.extra[:3]}) == 3  # fresh per pair
    assert torch.equal(paired_batch(pairs, [4, 5, 6], enc).extra, batch.extra)  # reproducible from the position
    assert torch.equal(paired_batch(pairs, [5], enc).extra[0], batch.extra[1])
    images = image_batch(pairs, [0, 1, 2, 3], enc)
    assert images.extra.shape == (4, E) and len({tuple(r.tolist()) for r in images.extra}) == 4
    seen = []
    sspo = winner_batch(pairs, [0, 1], enc, _sampler(seen))
    assert seen[0].extra.shape == (2, E) and torch.equal(sspo.extra, seen[0].extra.repeat(2, 1))


def test_the_step_hands_extra_to_both_forwards(families, pairs):
    """preference_loss gives each forward the batch's extra; the toy's prediction moves with it."""
    _, toy = families
    enc = Encoders(toy, 32, False, True, 1)
    batch = paired_batch(pairs, [0, 1], enc)
    calls = []

    def forward(tag):
        def run(noisy, t, emb, pooled, extra=None):
            calls.append((tag, extra))
            return toy.denoise(toy.denoiser, noisy, t, emb, pooled, extra)

        return run

    from fastpref.training.losses import get_loss_type

    dpo = get_loss_type("dpo")
    with torch.no_grad():
        _, metrics = preference_loss(forward("policy"), forward("reference"), toy, dpo, batch)
        _, shifted = preference_loss(
            forward("policy"), forward("reference"), toy, dpo, batch._replace(extra=batch.extra * 2)
        )
    assert [tag for tag, _ in calls] == ["policy", "reference"] * 2
    assert calls[0][1] is batch.extra and calls[1][1] is batch.extra
    assert torch.isfinite(metrics["model_mse"]) and not torch.equal(metrics["model_mse"], shifted["model_mse"])


def test_static_step_copies_extra_into_its_buffers():
    """The static-buffer step (what --cuda_graph captures) sees each step's extra, bit for bit as
    the regular step; a Batch without extra (None) stays None in the buffers."""
    g = torch.Generator().manual_seed(2)
    start = torch.randn(E, 4, generator=g)

    def make():
        weight = torch.nn.Parameter(start.clone())
        optimizer = make_optimizer([weight], 1e-2, static=True, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

        def loss_fn(batch):
            loss = ((batch.extra @ weight) * batch.latents.flatten(1)[:, :4]).square().mean()
            return loss, {"loss": loss.detach()}

        return weight, TrainStep(loss_fn, [weight], optimizer, max_grad_norm=1e9)

    def batch(extra):
        return Batch(*(torch.randn(2, 4, 2, 2, generator=g) for _ in range(6)), extra)

    (w_a, regular), (w_b, inner) = make(), make()
    static = StaticStep(inner, use_graph=False)
    for step in range(3):
        b = batch(torch.randn(2, E, generator=g))
        out_a, out_b = regular([b]), static([b])
        assert torch.equal(static.inputs[0].extra, b.extra) and static.inputs[0].extra is not b.extra
        assert torch.equal(out_a["loss"], out_b["loss"]) and torch.equal(out_a["grad_norm"], out_b["grad_norm"]), step
    assert torch.equal(w_a, w_b) and not torch.equal(w_a, start)
    with pytest.raises(ValueError, match=r"batch.extra: expected \(2, 3\) torch.float32 .*got \(2, 4\)"):
        static([batch(torch.randn(2, 4, generator=g))])
    with pytest.raises(ValueError, match="batch.extra: expected a tensor .*got None"):
        static([batch(None)])
    plain = Batch(*(torch.randn(2, 4, 2, 2, generator=g) for _ in range(6)))  # hand-built: extra None
    none = StaticStep(make()[1], use_graph=False)
    none.inputs = [_clone(plain)]
    assert none.inputs[0].extra is None and isinstance(none.inputs[0], Batch)
    again = Batch(*(torch.randn(2, 4, 2, 2, generator=g) for _ in range(6)))
    none._load([again])  # None stays None: nothing to copy
    assert none.inputs[0].extra is None and torch.equal(none.inputs[0].latents, again.latents)


class _Recorder:
    """A family stand-in for the self-sampler: records what ``sample`` received."""

    def __init__(self, width):
        self.width, self.kwargs = width, None

    def encode_prompts(self, captions):
        return torch.zeros(1, 2, 3), torch.zeros(1, 3)

    def sample(self, predict, emb, pooled, neg, neg_pooled, start, **kwargs):
        self.kwargs = kwargs
        return start

    def decode_latents(self, latents):
        return latents

    def encode_images(self, pixels, eps):
        return pixels + eps


@pytest.mark.parametrize("width", [0, 6])
def test_self_sampler_passes_extra_only_to_families_that_have_some(width):
    g = torch.Generator().manual_seed(9)
    family = _Recorder(width)
    sample_losers = self_sampler(lambda *a: None, family, num_steps=2, guidance_scale=3.0)
    half = Batch(*(torch.randn(2, 4, 2, 2, generator=g) for _ in range(6)), torch.rand(2, width, generator=g))
    start, eps = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    out = sample_losers(half, start, eps)
    torch.testing.assert_close(out, start.clamp(-1, 1) + eps)
    expected = {"num_steps": 2, "guidance_scale": 3.0} | ({"extra": half.extra} if width else {})
    assert family.kwargs.keys() == expected.keys()
    if width:
        assert family.kwargs["extra"] is half.extra
