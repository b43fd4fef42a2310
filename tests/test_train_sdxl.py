"""The SDXL family (``fastpref/training/families/sdxl.py``) on the bundled tiny SDXL pipeline.

The time ids and the pair transform are checked against an eager re-implementation of diffusers'
``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py`` as read at
huggingface/diffusers commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (``preprocess_train``:
original size of ``jpg_0``, ``jpg_1`` resized to it, torchvision ``Resize(resolution)``, flip, then
centre or random crop with its top-left; ``compute_time_ids``: ``original_size + crop_top_left +
(resolution, resolution)``, repeated for the pair; ``encode_prompt``: penultimate hidden states of
both encoders concatenated, pooled output of the last). The prompt embeddings and the sampler are
checked against ``StableDiffusionXLPipeline`` itself; training runs end to end in both reference
modes, and the saved weights load into the pipeline.
"""

import csv
import io
import json
import math
import shutil

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from helpers import needs_kernels
from PIL import Image

from fastpref import train
from fastpref.training.args import ASSETS, BUNDLED_DATA
from fastpref.training.batches import Encoders, paired_batch
from fastpref.training.data import PreferencePairs
from fastpref.training.families.sdxl import StableDiffusionXLFamily
from fastpref.training.family import family_class, load_family

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
MODEL = ASSETS / "tiny-sdxl"
DATA = ASSETS / "tiny-sdxl-prefs.parquet"
FAST = ["--pretrained_model_name_or_path", str(MODEL), "--train_batch_size", "2", "--report_to", "csv"]


@pytest.fixture(scope="module")
def family():
    return load_family(MODEL, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


# --- diffusers' train_diffusion_dpo_sdxl.py, re-implemented eagerly (torchvision is not installed:
# its Resize / CenterCrop / RandomCrop / RandomHorizontalFlip on tensors written out) ---


def _script_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)`` (bilinear, antialias) on a ``[C, h, w]`` tensor: the shorter
    side to ``size``, the longer to ``int(size * long / short)``."""
    h, w = x.shape[-2:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]


def _script_pair(jpg_0: bytes, jpg_1: bytes, label_0: float, resolution: int, *, flip: bool, crop=None):
    """``preprocess_train`` for one row and ``compute_time_ids`` for it, with the script's random
    choices given: ``flip`` (``random.random() < 0.5``) and ``crop`` (``RandomCrop.get_params``'s
    ``(y1, x1)``; None: ``CenterCrop``). Returns ``(winner [3, r, r], loser [3, r, r], time ids [1, 6])``."""
    image_0 = Image.open(io.BytesIO(jpg_0)).convert("RGB")
    original_size = (image_0.height, image_0.width)
    image_1 = Image.open(io.BytesIO(jpg_1)).convert("RGB")
    image_1 = image_1.resize(original_size[::-1])  # "::-1" because PIL resize takes (width, height)
    to_tensor = [
        torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in (image_0, image_1)
    ]
    pair = to_tensor if label_0 != 0 else to_tensor[::-1]
    combined = _script_resize(torch.cat(pair, dim=0), resolution)
    if flip:
        combined = combined.flip(-1)
    if crop is None:
        y1 = max(0, int(round((combined.shape[1] - resolution) / 2.0)))
        x1 = max(0, int(round((combined.shape[2] - resolution) / 2.0)))
    else:
        y1, x1 = crop
    combined = combined[:, y1 : y1 + resolution, x1 : x1 + resolution]
    combined = (combined - 0.5) / 0.5
    time_ids = torch.tensor([list(original_size + (y1, x1) + (resolution, resolution))])
    return combined[:3], combined[3:], time_ids


def _png(rng: np.random.Generator, height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pairs_file(tmp_path, rows):
    """A Pick-a-Pic parquet of ``rows`` = [(jpg_0, jpg_1, label_0)]."""
    path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table(
            {
                "jpg_0": pa.array([r[0] for r in rows], pa.binary()),
                "jpg_1": pa.array([r[1] for r in rows], pa.binary()),
                "label_0": [float(r[2]) for r in rows],
                "caption": [f"a red circle {i}" for i in range(len(rows))],
            }
        ),
        path,
    )
    return path


SIZES = [  # (jpg_0 size, jpg_1 size, label_0): portrait / landscape, odd and even excess, a mismatched pair
    ((45, 37), (45, 37), 1.0),
    ((37, 45), (37, 45), 0.0),
    ((32, 51), (32, 51), 1.0),
    ((40, 33), (50, 41), 0.0),
    ((40, 33), (36, 36), 1.0),
]


def _rows_of(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    rows = [(_png(rng, *a), _png(rng, *b), label) for a, b, label in SIZES]
    return rows, PreferencePairs([_pairs_file(tmp_path, rows)])


def test_centre_crop_time_ids_and_pixels_are_the_scripts(family, tmp_path):
    rows, pairs = _rows_of(tmp_path)
    for index, (jpg_0, jpg_1, label_0) in enumerate(rows):
        caption, winner, loser = pairs[index]
        (w, l), extra = family.prepare_images(
            [winner, loser], 32, random_crop=False, hflip=False, generator=torch.Generator().manual_seed(index)
        )
        ref_w, ref_l, ref_ids = _script_pair(jpg_0, jpg_1, label_0, 32, flip=False)
        assert extra.dtype == torch.float32 and torch.equal(extra, ref_ids[0].float()), (index, extra, ref_ids)
        if SIZES[index][0] == SIZES[index][1]:  # same size: no PIL resize of jpg_1 (whose filter we do not copy)
            torch.testing.assert_close(w, ref_w, atol=2e-6, rtol=0)
            torch.testing.assert_close(l, ref_l, atol=2e-6, rtol=0)
        elif label_0 == 1.0:  # the winner is jpg_0, not resized before the shared resize
            torch.testing.assert_close(w, ref_w, atol=2e-6, rtol=0)
    # the mismatched pairs: original size is jpg_0's whichever image won
    assert [tuple(family.prepare_images(list(pairs[i][1:]), 32, random_crop=False, hflip=False,
            generator=torch.Generator())[1][:2].int().tolist()) for i in (3, 4)] == [(40, 33), (40, 33)]  # fmt: skip


@pytest.mark.parametrize("index,axis", [(0, 2), (1, 3)])  # 45 x 37 -> 38 x 32: 7 crop rows; 37 x 45: 7 columns
def test_random_crop_and_flip_are_the_scripts_for_the_drawn_choice(family, tmp_path, index, axis):
    """Random crop + flip: the pixels are the script's transform (flip, then crop, the left offset
    counted in the flipped image) for the flip and crop that the time ids report, and over seeds
    every crop offset and both flips occur."""
    rows, pairs = _rows_of(tmp_path, seed=1)
    jpg_0, jpg_1, label_0 = rows[index]
    offsets, flips = set(), set()
    for seed in range(40):
        (w, l), extra = family.prepare_images(
            list(pairs[index][1:]), 32, random_crop=True, hflip=True, generator=torch.Generator().manual_seed(seed)
        )
        top, left = int(extra[2]), int(extra[3])
        matches = []
        for flip in (False, True):
            ref_w, ref_l, ref_ids = _script_pair(jpg_0, jpg_1, label_0, 32, flip=flip, crop=(top, left))
            if torch.allclose(w, ref_w, atol=2e-6, rtol=0) and torch.allclose(l, ref_l, atol=2e-6, rtol=0):
                matches.append(flip)
                assert torch.equal(extra, ref_ids[0].float())
        assert len(matches) == 1, (seed, top, left)  # random pixels: exactly one flip fits
        offsets.add(int(extra[axis]))
        flips.add(matches[0])
        assert int(extra[5 - axis]) == 0  # the other axis has no room
    assert offsets == set(range(7)) and flips == {False, True}


def test_a_pair_shares_its_time_ids_and_the_unet_receives_them(family, tmp_path, monkeypatch):
    rows, pairs = _rows_of(tmp_path, seed=2)
    enc = Encoders(family, 32, True, True, 3)
    batch = paired_batch(pairs, [0, 1, 2], enc)
    assert batch.extra.shape == (6, 6) and torch.equal(batch.extra[:3], batch.extra[3:])
    assert batch.extra[:, 4:].eq(32).all() and batch.extra[:, :2].ge(32).all()
    seen = {}
    forward = UNet2DConditionModel.forward

    def spy(module, *args, added_cond_kwargs=None, **kwargs):
        seen.update(added_cond_kwargs)
        return forward(module, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    noisy, _ = family.add_noise(batch.latents, batch.noise, batch.timesteps)
    with torch.no_grad():
        pred = family.denoise(family.denoiser, noisy, batch.timesteps, batch.embeddings, batch.pooled, batch.extra)
        moved = family.denoise(
            family.denoiser, noisy, batch.timesteps, batch.embeddings, batch.pooled, batch.extra + 16
        )
    assert seen["time_ids"].dtype == batch.embeddings.dtype
    torch.testing.assert_close(seen["time_ids"], batch.extra + 16)
    assert seen["text_embeds"] is batch.pooled
    assert pred.shape == batch.latents.shape and not torch.allclose(pred, moved)  # the time ids condition the UNet


def test_prompt_embeddings_are_the_pipelines(family, pipe):
    captions = ["a red circle", "a blue square", ""]
    embeddings, pooled = family.encode_prompts(captions)
    ref, _, ref_pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert embeddings.shape == (3, 8, 64) and pooled.shape == (3, 32)
    torch.testing.assert_close(embeddings, ref, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    # the DPO script's encode_prompt, eagerly: hidden_states[-2] of each encoder, pooled of the last
    states = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    torch.testing.assert_close(embeddings, torch.cat(states, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(pooled, out[0], rtol=0, atol=0)


def test_sspo_sampler_is_the_pipelines_ddim_with_guidance_and_time_ids(family, pipe):
    """family.sample (zero unconditional embeddings, as force_zeros_for_empty_prompt) equals
    StableDiffusionXLPipeline's DDIM sampling from the same start noise with those time ids."""
    g = torch.Generator().manual_seed(4)
    start = torch.randn(2, 4, 8, 8, generator=g)
    embeddings, pooled = family.encode_prompts(["a red circle", "a green triangle"])
    negative, negative_pooled = family.encode_prompts([""])
    time_ids = torch.tensor([40.0, 36.0, 3.0, 1.0, 32.0, 32.0]).repeat(2, 1)
    assert family.force_zeros_for_empty_prompt

    def predict(x, t, e, p, extra=None):
        return family.denoise(family.denoiser, x, t, e, p, extra)

    ours = family.sample(
        predict, embeddings, pooled, negative, negative_pooled, start, num_steps=5, guidance_scale=3.0, extra=time_ids
    )
    pipe.scheduler = DDIMScheduler.from_config(family.scheduler.config)
    ref = pipe(
        prompt_embeds=embeddings,
        pooled_prompt_embeds=pooled,
        latents=start.clone(),
        num_inference_steps=5,
        guidance_scale=3.0,
        original_size=(40, 36),
        crops_coords_top_left=(3, 1),
        target_size=(32, 32),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    plain = family.sample(
        predict, embeddings, pooled, negative, negative_pooled, start, num_steps=5, guidance_scale=3.0
    )
    assert not torch.allclose(plain, ours)  # default time ids (32, 32, 0, 0, 32, 32) differ from these


def _pipeline_latents(pipe):
    return pipe(
        prompt=["a red circle"],
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


@needs_kernels
def test_lora_run_on_the_bundled_data_loads_into_the_pipeline(tmp_path):
    out = tmp_path / "lora"
    train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--learning_rate", "1e-2", "--random_crop"])
    args = json.loads((out / "args.json").read_text())
    assert BUNDLED_DATA[MODEL] == DATA and args["data_path"] == str(DATA)  # no data flag: the SDXL set
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["model_mse"]) == pytest.approx(float(rows[0]["ref_mse"]), rel=1e-5)  # adapters start at 0
    assert float(rows[1]["model_mse"]) != pytest.approx(float(rows[1]["ref_mse"]), rel=1e-6)
    lora = StableDiffusionXLPipeline.from_pretrained(MODEL)
    lora.set_progress_bar_config(disable=True)
    before = _pipeline_latents(lora)
    lora.load_lora_weights(out)
    after = _pipeline_latents(lora)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


@needs_kernels
def test_copy_run_writes_a_unet_the_pipeline_takes(tmp_path):
    out = tmp_path / "copy"
    train.main(
        [*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--reference", "copy", "--learning_rate", "1e-3"]
    )
    assert len(_rows(out)) == 2
    trained = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    assert trained.config.addition_embed_type == "text_time"
    base_params = dict(base.named_parameters())
    assert any(not torch.equal(p, base_params[n]) for n, p in trained.named_parameters())
    full = StableDiffusionXLPipeline.from_pretrained(MODEL, unet=trained)
    full.set_progress_bar_config(disable=True)
    original = StableDiffusionXLPipeline.from_pretrained(MODEL)
    original.set_progress_bar_config(disable=True)
    assert not torch.allclose(_pipeline_latents(full), _pipeline_latents(original))


@needs_kernels
def test_sspo_self_samples_with_the_time_ids(tmp_path, monkeypatch):
    calls = []
    sample = StableDiffusionXLFamily.sample

    def spy(self, *args, extra=None, **kwargs):
        calls.append(extra)
        return sample(self, *args, extra=extra, **kwargs)

    monkeypatch.setattr(StableDiffusionXLFamily, "sample", spy)
    out = tmp_path / "sspo"
    train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", "--loss_type", "sspo",
                "--sspo_sample_steps", "2"])  # fmt: skip
    assert len(calls) == 1 and calls[0].shape == (2, 6) and calls[0][:, 4:].eq(32).all()
    assert math.isfinite(float(_rows(out)[0]["loss"]))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--resolution", "30"], r"--resolution: expected a multiple of the VAE downsampling factor 4, got 30"),
        (["--resolution", "36"], r"--resolution: StableDiffusionXLPipeline takes image sizes that are multiples of 8"),
    ],
)
def test_bad_resolution_is_refused_before_any_write(tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, *flags, "--output_dir", str(out)])
    assert not out.exists()


def test_bad_pipeline_directories_are_refused_before_any_write(tmp_path):
    assert family_class(MODEL) is StableDiffusionXLFamily
    assert StableDiffusionXLFamily.default_resolution(MODEL) == 32
    broken = tmp_path / "no-encoder-2"
    shutil.copytree(MODEL, broken)
    shutil.rmtree(broken / "text_encoder_2")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Stable Diffusion XL directory .*\(missing \['text_encoder_2'\]\)"):
        train.main([*FAST[2:], "--pretrained_model_name_or_path", str(broken), "--output_dir", str(out)])
    plain = tmp_path / "no-time-ids"
    shutil.copytree(MODEL, plain)
    config = json.loads((plain / "unet" / "config.json").read_text())
    (plain / "unet" / "config.json").write_text(json.dumps({**config, "addition_embed_type": None}))
    with pytest.raises(ValueError, match=r"addition_embed_type 'text_time' .*got None"):
        train.main([*FAST[2:], "--pretrained_model_name_or_path", str(plain), "--output_dir", str(out)])
    assert not out.exists()
