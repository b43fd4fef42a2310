"""The Flux family (``fastpref/training/families/flux.py``) on the bundled tiny Flux pipeline.

Packing, unpacking and the image ids are checked against a float64 re-implementation of the
layout that ``FluxPipeline._pack_latents`` / ``_prepare_latent_image_ids`` produce (diffusers 0.42
``pipelines/flux/pipeline_flux.py``: token ``(i, j)`` of the ``(h/2) x (w/2)`` grid holds channels
``c * 4 + 2 di + dj`` = latent ``[c, 2i + di, 2j + dj]``, id ``(0, i, j)``); the transformer call
(``t / 1000``, zero ``txt_ids``, guidance input) against the LoRA script's; the prompt embeddings
against ``FluxPipeline.encode_prompt``; training end to end in both reference modes, the saved
weights loading into the pipeline.
"""

import csv
import json
import math
from types import SimpleNamespace

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from helpers import needs_kernels

from fastpref import train
from fastpref.training.args import ASSETS, BUNDLED_DATA
from fastpref.training.families.flux import GUIDANCE_SCALE, FluxFamily
from fastpref.training.family import family_class, load_family

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
MODEL = ASSETS / "tiny-flux"
DATA = ASSETS / "tiny-prefs.parquet"  # shared with SD1.5 until tiny-flux-prefs.parquet is built
FAST = [
    "--pretrained_model_name_or_path", str(MODEL), "--dataset_name", str(DATA),
    "--train_batch_size", "2", "--report_to", "csv",
]  # fmt: skip


@pytest.fixture(scope="module")
def family():
    return load_family(MODEL, torch.device("cpu"), torch.float32)


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _reference_pack(x: torch.Tensor) -> torch.Tensor:
    """``[R, C, h, w]`` -> ``[R, (h/2)(w/2), 4C]`` element by element (float64)."""
    rows, channels, height, width = x.shape
    out = torch.empty(rows, (height // 2) * (width // 2), 4 * channels, dtype=torch.float64)
    for i in range(height // 2):
        for j in range(width // 2):
            for c in range(channels):
                for di in range(2):
                    for dj in range(2):
                        out[:, i * (width // 2) + j, c * 4 + 2 * di + dj] = x[:, c, 2 * i + di, 2 * j + dj]
    return out


@pytest.mark.parametrize("height,width", [(8, 8), (6, 10)])
def test_pack_unpack_and_ids_are_fluxs_layout(family, height, width):
    x = torch.randn(3, 4, height, width, generator=torch.Generator().manual_seed(height * width), dtype=torch.float64)
    tokens = family.pack(x)
    torch.testing.assert_close(tokens, _reference_pack(x), rtol=0, atol=0)
    torch.testing.assert_close(family.unpack(tokens, height, width), x, rtol=0, atol=0)
    ids = family.image_ids(height, width, torch.device("cpu"), torch.float64)
    grid = [(0.0, float(i), float(j)) for i in range(height // 2) for j in range(width // 2)]
    torch.testing.assert_close(ids, torch.tensor(grid, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_denoise_calls_the_transformer_as_the_lora_script(family, guidance_embeds):
    calls = {}

    def model(**kwargs):
        calls.update(kwargs)
        return (kwargs["hidden_states"] * 2.0,)

    model.config = SimpleNamespace(guidance_embeds=guidance_embeds)
    g = torch.Generator().manual_seed(7)
    noisy, embeddings, pooled = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.randn(2, 5, 32),
        torch.randn(2, 32, generator=g),
    )
    timesteps = torch.tensor([123.5, 870.25])
    out = family.denoise(model, noisy, timesteps, embeddings, pooled)
    torch.testing.assert_close(out, 2.0 * noisy)  # unpacked back to [R, C, h, w]
    torch.testing.assert_close(calls["timestep"].double(), timesteps.double() / 1000.0)
    assert calls["txt_ids"].shape == (5, 3) and not calls["txt_ids"].any()
    assert calls["img_ids"].shape == (16, 3) and calls["hidden_states"].shape == (2, 16, 16)
    if guidance_embeds:
        assert GUIDANCE_SCALE == 3.5 and torch.equal(calls["guidance"], torch.full((2,), 3.5))
    else:
        assert calls["guidance"] is None


def test_prompt_embeddings_are_the_pipelines(family):
    pipe = FluxPipeline.from_pretrained(MODEL)
    captions = ["a red circle", "a blue square", ""]
    embeddings, pooled = family.encode_prompts(captions)
    ref_embeddings, ref_pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=512)
    assert embeddings.shape == (3, 512, 32) and pooled.shape == (3, 32)
    torch.testing.assert_close(embeddings, ref_embeddings)
    torch.testing.assert_close(pooled, ref_pooled)
    assert not text_ids.any()


def _pipeline_latents(pipe):
    return pipe(
        prompt=["a red circle"],
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


@needs_kernels
def test_lora_run_on_the_bundled_data_loads_into_the_pipeline(tmp_path):
    out = tmp_path / "lora"
    train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--learning_rate", "1e-2"])
    args = json.loads((out / "args.json").read_text())
    assert MODEL not in BUNDLED_DATA and args["data_path"] == str(DATA)  # its own set is not built yet
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"] and all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["model_mse"]) == pytest.approx(float(rows[0]["ref_mse"]), rel=1e-5)  # adapters start at 0
    assert float(rows[1]["model_mse"]) != pytest.approx(float(rows[1]["ref_mse"]), rel=1e-6)
    lora = FluxPipeline.from_pretrained(MODEL)
    lora.set_progress_bar_config(disable=True)
    before = _pipeline_latents(lora)
    lora.load_lora_weights(out)
    after = _pipeline_latents(lora)
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


@needs_kernels
def test_copy_run_writes_a_transformer_the_pipeline_takes(tmp_path):
    out = tmp_path / "copy"
    train.main(
        [*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--reference", "copy", "--learning_rate", "1e-3"]
    )
    assert len(_rows(out)) == 2
    trained = FluxTransformer2DModel.from_pretrained(out / "transformer")
    base = FluxTransformer2DModel.from_pretrained(MODEL, subfolder="transformer")
    base_params = dict(base.named_parameters())
    assert any(not torch.equal(p, base_params[n]) for n, p in trained.named_parameters())
    full = FluxPipeline.from_pretrained(MODEL, transformer=trained)
    full.set_progress_bar_config(disable=True)
    original = FluxPipeline.from_pretrained(MODEL)
    original.set_progress_bar_config(disable=True)
    assert not torch.allclose(_pipeline_latents(full), _pipeline_latents(original))


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--resolution", "30"], r"--resolution: expected a multiple of the VAE downsampling factor 4, got 30"),
        (["--resolution", "36"], r"--resolution: Flux packs the latent in 2x2 patches, expected a multiple of 8"),
    ],
)
def test_bad_resolution_is_refused_before_any_write(tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, *flags, "--output_dir", str(out)])
    assert not out.exists()


def test_family_is_read_from_the_pipeline_and_defaults_to_32_px():
    assert family_class(MODEL) is FluxFamily
    assert FluxFamily.default_resolution(MODEL) == 32


def test_sampling_sigmas_are_the_pipelines_schedule(family):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    pipe = FluxPipeline.from_pretrained(MODEL)
    c = pipe.scheduler.config
    mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)  # 8 x 8 latent
    sigmas = torch.linspace(1.0, 1.0 / 5, 5, dtype=torch.float64).numpy()
    retrieve_timesteps(pipe.scheduler, 5, "cpu", sigmas=sigmas, mu=mu)
    torch.testing.assert_close(family.sampling_sigmas(5, (4, 8, 8)), pipe.scheduler.sigmas.float())
