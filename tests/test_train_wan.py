"""The Wan text-to-video family (``fastpref/training/families/wan.py``) on the bundled tiny Wan
pipeline (``fastpref/assets/tiny-wan``) and its video preference set.

The prompt embeddings, the latent normalisation and the SSPO sampler are checked against
``WanPipeline`` itself (diffusers 0.42.1); every loss type's row reduction on 5-D video latents
``[R, C, F, H, W]`` against a float64 reference that averages over all of C, F, H and W
(VideoDPO's ``lvdm/models/ddpm3d.py`` ``dpo_loss``, read at CIntellifusion/VideoDPO
1febdb42db147824ba4c96eb5e787bbd1295afc7, reduces over dims [1, 2, 3] only, which leaves W
unreduced on 5-D input; re-implemented here as ``_reference_dpo(..., dims=(1, 2, 3))``); training
runs end to end in both reference modes and with SSPO's self-sampled clips, and
the saved weights load into ``WanPipeline`` and change its output.
"""

import csv
import json
import math

import av  # noqa: F401  (the video extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from helpers import needs_kernels

import fastpref
from fastpref import train
from fastpref.tiny.motion import random_videos
from fastpref.tiny.wan_vae import to_pixels
from fastpref.training.args import ASSETS, BUNDLED_DATA
from fastpref.training.batches import Batch
from fastpref.training.config import parse_config
from fastpref.training.families.wan import WanFamily
from fastpref.training.family import family_class, load_family
from fastpref.training.losses import LOSS_TYPES, get_loss_type

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
MODEL = ASSETS / "tiny-wan"
DATA = ASSETS / "tiny-wan-prefs.parquet"
FAST = ["--pretrained_model_name_or_path", str(MODEL), "--train_batch_size", "2", "--report_to", "csv"]
PROMPTS = ["a red circle moving left", "a blue square moving up", "", "a zebra galloping somewhere red"]


@pytest.fixture(scope="module")
def family():
    family = load_family(MODEL, torch.device("cpu"), torch.float32)
    family.configure(parse_config(pretrained_model_name_or_path=str(MODEL), num_frames=9))
    return family


@pytest.fixture(scope="module")
def pipe():
    pipe = WanPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _pipeline_latents(pipe, steps: int = 2) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS[:2],
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="latent",
        max_sequence_length=16,
    ).frames


def test_registry_and_shapes(family):
    assert family_class(MODEL) is WanFamily and WanFamily.media == "videos"
    assert family.max_sequence_length == 16  # the tiny tokenizer's model_max_length
    assert family.latent_shape(32) == (4, 5, 8, 8)  # 9 frames -> 1 + 8 / 2 latent frames
    assert BUNDLED_DATA[MODEL] == DATA


def test_prompt_embeddings_are_the_pipelines(family, pipe):
    embeddings, pooled = family.encode_prompts(PROMPTS)
    with torch.no_grad():
        ref = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=16, device=torch.device("cpu"))
    assert embeddings.shape == (4, 16, 32) and pooled.shape == (4, 32)
    torch.testing.assert_close(embeddings, ref, rtol=0, atol=2e-6)
    assert embeddings[0, 6:].abs().max() == 0 and embeddings[0, 5].abs().max() > 0  # 5 words + </s>, then zeros
    torch.testing.assert_close(pooled[1], ref[1, :6].mean(0), rtol=0, atol=2e-6)


def test_latents_are_normalised_as_the_pipeline_decodes_them(family, pipe):
    pixels = to_pixels(random_videos(2, seed=5)[0])
    eps = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = family.encode_images(pixels, eps)
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (dist.mean + dist.std * eps - mean) / std, rtol=1e-5, atol=1e-5)
    decoded = family.decode_latents(latents)
    assert decoded.shape == pixels.shape and (decoded - pixels).abs().mean() < 0.06


def test_sspo_sampler_is_the_pipelines_euler_with_guidance(family, pipe):
    embeddings, pooled = family.encode_prompts(PROMPTS[:2])
    negative, negative_pooled = family.encode_prompts([""])
    start = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(3))

    def predict(x, t, emb, pooled_, extra=None):
        return family.denoise(family.denoiser, x, t, emb, pooled_, extra)

    ours = family.sample(predict, embeddings, pooled, negative, negative_pooled, start, num_steps=4, guidance_scale=3.0)
    with torch.no_grad():
        ref = pipe(
            prompt_embeds=embeddings,
            negative_prompt_embeds=negative.expand_as(embeddings),
            latents=start.clone(),
            height=32,
            width=32,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=3.0,
            output_type="latent",
        ).frames
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _video_batch(rows: int, g: torch.Generator) -> Batch:
    shape = (rows, 3, 4, 2, 5)  # C, F, H, W all different, so a reduction over the wrong axes shows
    return Batch(
        latents=torch.randn(shape, generator=g),
        embeddings=torch.randn(rows, 3, 8, generator=g),
        pooled=torch.randn(rows // 2, 8, generator=g).repeat(2, 1),
        noise=torch.randn(shape, generator=g),
        timesteps=torch.tensor([100.0, 900.0]).repeat(rows // 2),
        labels=torch.tensor([1.0, 0.0, 0.0, 1.0]),
    )


def _reference_dpo(model, ref, target, beta, dims):
    """Diffusion-DPO in float64 with per-row means over ``dims`` (docs/methods.md §2.1)."""
    m = (model.double() - target.double()).pow(2).mean(dim=dims)
    r = (ref.double() - target.double()).pow(2).mean(dim=dims)
    half = m.shape[0] // 2
    inside = -0.5 * beta * ((m[:half] - m[half:]) - (r[:half] - r[half:]))
    return torch.nn.functional.softplus(-inside).mean()


@needs_kernels
def test_dpo_on_5d_latents_reduces_over_all_of_c_f_h_w_against_float64():
    g = torch.Generator().manual_seed(7)
    target = torch.randn(4, 3, 4, 2, 5, generator=g)
    ref = target + 0.2 * torch.randn(target.shape, generator=g)
    model = (ref + 0.05 * torch.randn(target.shape, generator=g)).requires_grad_()
    loss, _ = fastpref.diffusion_dpo_loss(model, ref, target, beta=1000.0)
    loss.backward()
    model64 = model.detach().double().requires_grad_()
    expected = _reference_dpo(model64, ref, target, 1000.0, dims=(1, 2, 3, 4))
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model.grad.double(), model64.grad, rtol=1e-5, atol=1e-10)
    # VideoDPO's reduction over [1, 2, 3] leaves a [B, W] error: a different loss, which this would catch
    partial = _reference_dpo(model64.detach(), ref, target, 1000.0, dims=(1, 2, 3))
    assert abs(partial.item() - expected.item()) > 0.01 * expected.item()


@needs_kernels
@pytest.mark.parametrize("name", sorted(LOSS_TYPES))
def test_every_loss_type_reduces_5d_rows_as_flat_rows(name):
    """Each ``--loss_type`` on ``[R, C, F, H, W]`` equals the same loss on the rows flattened to
    ``[R, C·F·H·W]``: every element of a row counts, whatever the video layout."""
    g = torch.Generator().manual_seed(11)
    entry, batch = get_loss_type(name), _video_batch(4, g)
    target = torch.randn(batch.latents.shape, generator=g)
    ref = target + 0.3 * torch.randn(target.shape, generator=g)
    model = (ref + 0.05 * torch.randn(target.shape, generator=g)).requires_grad_()
    flat = model.detach().flatten(1).requires_grad_()
    ref_in = ref if entry.needs_reference else None
    beta = None if entry.default_beta is None else entry.default_beta / 100  # off the hinge's flat part
    loss, _ = entry(model, ref_in, target, batch, beta=beta)
    flat_loss, _ = entry(flat, None if ref_in is None else ref.flatten(1), target.flatten(1), batch, beta=beta)
    loss.backward()
    flat_loss.backward()
    torch.testing.assert_close(loss, flat_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.grad.flatten(1), flat.grad, rtol=1e-4, atol=1e-8)
    assert torch.isfinite(loss) and model.grad.abs().sum() > 0


@needs_kernels
def test_lora_run_on_the_bundled_videos_loads_into_the_pipeline(tmp_path):
    out = tmp_path / "lora"
    train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--learning_rate", "1e-2"])
    args = json.loads((out / "args.json").read_text())
    assert args["data_path"] == str(DATA)  # no data flag: the bundled video set
    assert (args["num_frames"], args["resolution"]) == (9, 32)  # from the first video
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["model_mse"]) == pytest.approx(float(rows[0]["ref_mse"]), rel=1e-5)  # adapters start at 0
    assert float(rows[1]["model_mse"]) != pytest.approx(float(rows[1]["ref_mse"]), rel=1e-6)
    lora = WanPipeline.from_pretrained(MODEL)
    lora.set_progress_bar_config(disable=True)
    before = _pipeline_latents(lora)
    lora.load_lora_weights(out)
    after = _pipeline_latents(lora)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


@needs_kernels
def test_copy_run_writes_a_transformer_the_pipeline_takes(tmp_path):
    out = tmp_path / "copy"
    train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", "--reference", "copy", "--loss_type", "kto"])
    assert len(_rows(out)) == 1
    trained = WanTransformer3DModel.from_pretrained(out / "transformer")
    base = dict(WanTransformer3DModel.from_pretrained(MODEL, subfolder="transformer").named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in trained.named_parameters())
    full = WanPipeline.from_pretrained(MODEL, transformer=trained)
    full.set_progress_bar_config(disable=True)
    original = WanPipeline.from_pretrained(MODEL)
    original.set_progress_bar_config(disable=True)
    assert not torch.allclose(_pipeline_latents(full, 1), _pipeline_latents(original, 1))


@needs_kernels
def test_sspo_self_samples_video_clips_with_checkpoint_replay(tmp_path, monkeypatch):
    shapes = []
    sample = WanFamily.sample

    def spy(self, *args, **kwargs):
        out = sample(self, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(WanFamily, "sample", spy)
    out = tmp_path / "sspo"
    flags = ["--loss_type", "sspo", "--sspo_sample_steps", "2", "--sspo_snapshot_steps", "1", "--max_train_steps", "2"]
    train.main([*FAST, "--output_dir", str(out), *flags])
    assert shapes == [(2, 4, 5, 8, 8)] * 2  # one self-sampled clip per winner, per step
    rows = _rows(out)
    assert [r["replayed_step"] for r in rows][0] == "0" and all(math.isfinite(float(r["loss"])) for r in rows)
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--num_frames", "8"], r"--num_frames: .* 1 \+ 4k frames .* got 8"),
        (["--num_frames", "13"], r"has 9 frames; --num_frames 13 with --frame_stride 1 needs at least 13"),
        (["--resolution", "34"], r"--resolution: expected a multiple of the VAE downsampling factor 4, got 34"),
        (["--resolution", "20"], r"--resolution: .* multiple of 8 .* got 20"),
        (["--dataset_name", str(ASSETS / "tiny-prefs.parquet")], "an image preference set: this pipeline trains"),
        (["--online_pairs_every", "5"], "--online_pairs_every: on-line pairs are made for image families"),
    ],
)
def test_bad_video_input_is_refused_before_any_write(tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, *flags, "--output_dir", str(out)])
    assert not out.exists()


def test_image_families_refuse_the_video_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--num_frames: a video flag, .* takes no video flags; got 9"):
        train.build(parse_config(["--num_frames", "9", "--output_dir", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()
