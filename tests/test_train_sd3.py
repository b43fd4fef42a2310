"""The SD3 family (fastpref/training/families/sd3.py) on the bundled tiny SD3 pipeline: its
conditioning and sampler against StableDiffusion3Pipeline's own code (with and without T5), end
to end in both reference modes, the LoRA loaded by the pipeline, exact resume after a kill, and
the refusals of bad input before anything is written."""

import csv
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import proc_helpers
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from helpers import needs_kernels
from safetensors.torch import load_file

from fastpref import train
from fastpref.training.args import ASSETS, default_data
from fastpref.training.families.sd3 import MAX_SEQUENCE_LENGTH, StableDiffusion3Family
from fastpref.training.family import family_class

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TINY_SD3 = ASSETS / "tiny-sd3"
FAST = ["--pretrained_model_name_or_path", str(TINY_SD3), "--train_batch_size", "1", "--report_to", "none"]
CAPTIONS = ["a red circle", "a blue square", ""]


def _rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion3Pipeline.from_pretrained(TINY_SD3)


@pytest.fixture(scope="module")
def family():
    return StableDiffusion3Family.load(TINY_SD3, torch.device("cpu"), torch.float32)


def _family_of(pipe):
    t5 = None if pipe.text_encoder_3 is None else (pipe.tokenizer_3, pipe.text_encoder_3)
    return StableDiffusion3Family(
        (pipe.tokenizer, pipe.tokenizer_2),
        (pipe.text_encoder, pipe.text_encoder_2),
        t5,
        pipe.vae,
        pipe.transformer,
        pipe.scheduler,
        torch.device("cpu"),
        torch.float32,
    )


def test_bundled_pipeline_registry_data_and_size(pipe):
    assert family_class(TINY_SD3) is StableDiffusion3Family
    assert default_data(TINY_SD3) == ASSETS / "tiny-sd3-prefs.parquet" and default_data(TINY_SD3).is_file()
    assert pipe.text_encoder_3 is not None and pipe.vae.config.shift_factor == 0.0
    assert StableDiffusion3Family.default_resolution(TINY_SD3) == 32 and StableDiffusion3Family.check(TINY_SD3) == 4
    size_mb = sum(f.stat().st_size for f in TINY_SD3.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 8


def test_prompt_encoding_equals_the_pipelines_with_t5(pipe, family):
    """Bitwise, under no_grad as the pipeline's __call__ runs it (T5's SDPA differs by ~1e-6 with grad)."""
    emb, pooled = family.encode_prompts(CAPTIONS)
    with torch.no_grad():
        ref_emb, _, ref_pooled, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)
    clip_length = pipe.tokenizer.model_max_length
    assert emb.shape == (3, clip_length + MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (3, pipe.transformer.config.pooled_projection_dim)
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    assert emb[:, clip_length:].abs().sum() > 0  # the T5 part
    assert not torch.equal(emb[0], emb[1]) and not torch.equal(pooled[0], pooled[1])


def test_prompt_encoding_equals_the_pipelines_without_t5(pipe):
    """text_encoder_3 None, as StableDiffusion3Pipeline allows: zeros in the T5 part."""
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    emb, pooled = _family_of(no_t5).encode_prompts(CAPTIONS)
    with torch.no_grad():
        ref_emb, _, ref_pooled, _ = no_t5.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)
    clip_length = pipe.tokenizer.model_max_length
    assert emb.shape == (3, clip_length + MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert torch.equal(emb, ref_emb) and torch.equal(pooled, ref_pooled)
    assert not emb[:, clip_length:].any() and emb[:, :clip_length].abs().sum() > 0


def test_sampler_equals_the_pipelines_latents(pipe, family):
    """FlowMatchingFamily.sample (SSPO's self-sampler) against StableDiffusion3Pipeline's loop."""
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = CAPTIONS[:2]
    ref = pipe(prompts, latents=start.clone(), num_inference_steps=4, guidance_scale=3.0, output_type="latent").images
    emb, pooled = family.encode_prompts(prompts)
    neg, neg_pooled = family.encode_prompts([""])
    out = family.sample(
        lambda x, t, e, p: family.denoise(family.denoiser, x, t, e, p),
        emb,
        pooled,
        neg,
        neg_pooled,
        start,
        num_steps=4,
        guidance_scale=3.0,
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - start).abs().mean() > 0.1


def _transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cfg = transformer.config
    emb = torch.randn(2, 8 + MAX_SEQUENCE_LENGTH, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(x, emb, pooled, torch.tensor([700.0, 150.0]), return_dict=False)[0]


@needs_kernels
def test_lora_run_on_bundled_data_loads_into_the_pipeline(tmp_path):
    """Only --pretrained_model_name_or_path: trains on tiny-sd3-prefs.parquet; the saved LoRA loaded
    by StableDiffusion3Pipeline.load_lora_weights gives the trained transformer's output."""
    out = tmp_path / "lora"
    run = train.build(
        train.parse_config(
            [*FAST, "--output_dir", str(out), "--max_train_steps", "2", "--learning_rate", "1e-2", "--report_to", "csv"]
        )
    )
    assert run.config.data_path == str(ASSETS / "tiny-sd3-prefs.parquet") and run.config.resolution == 32
    train.train(run)
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["1", "2"]
    assert float(rows[0]["model_mse"]) == pytest.approx(float(rows[0]["ref_mse"]), rel=1e-5)  # adapters start at 0
    assert rows[0]["loss"] != rows[1]["loss"]
    trained = _transformer_output(run.family.denoiser.eval())
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_SD3)
    before = _transformer_output(pipe.transformer)
    pipe.load_lora_weights(out)
    after = _transformer_output(pipe.transformer)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, trained, rtol=1e-5, atol=1e-5)
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 32, 32, 3)


@needs_kernels
def test_copy_run_without_t5_writes_a_loadable_transformer(tmp_path):
    """--reference copy on the tiny pipeline with text_encoder_3 removed (model_index null, as a
    T5-less SD3 directory has it)."""
    no_t5 = tmp_path / "no-t5"
    shutil.copytree(TINY_SD3, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    )
    out = tmp_path / "copy"
    run = train.build(
        train.parse_config(
            [
                *FAST,
                "--pretrained_model_name_or_path",
                str(no_t5),
                "--dataset_name",
                str(ASSETS / "tiny-sd3-prefs.parquet"),
                "--output_dir",
                str(out),
                "--max_train_steps",
                "2",
                "--reference",
                "copy",
                "--learning_rate",
                "1e-4",
            ]
        )
    )
    assert run.family.t5 is None
    train.train(run)
    trained = SD3Transformer2DModel.from_pretrained(out / "transformer")
    base = SD3Transformer2DModel.from_pretrained(TINY_SD3, subfolder="transformer")
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed
    assert not torch.equal(_transformer_output(trained), _transformer_output(base))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(no_t5, transformer=trained, text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert image.images.shape == (1, 32, 32, 3)


@needs_kernels
def test_flow_flags_reach_the_run(tmp_path):
    """--weighting_scheme etc. through the command line into the family and args.json."""
    out = tmp_path / "out"
    flags = [
        "--report_to",
        "csv",
        "--loss_type",
        "dense_dpo",
        "--weighting_scheme",
        "mode",
        "--mode_scale",
        "1.1",
        "--logit_std",
        "0.7",
    ]
    run = train.build(train.parse_config([*FAST, "--output_dir", str(out), "--max_train_steps", "1", *flags]))
    assert (run.family.weighting_scheme, run.family.mode_scale, run.family.logit_std) == ("mode", 1.1, 0.7)
    assert run.family.logit_mean == 0.0  # not given: diffusers' default
    train.train(run)
    args = json.loads((out / "args.json").read_text())
    assert (args["weighting_scheme"], args["mode_scale"], args["logit_mean"]) == ("mode", 1.1, None)
    assert math.isfinite(float(_rows(out)[0]["loss"]))


@needs_kernels
def test_resume_after_kill_equals_the_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    args = [*FAST, "--checkpointing_steps", "1", "--report_to", "csv", "--weighting_scheme", "logit_normal"]
    proc = proc_helpers.start(
        [sys.executable, "-m", "fastpref.train", *args, "--output_dir", str(killed), "--max_train_steps", "1000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint-1" / "state.json").exists():
            assert proc.poll() is None, "trainer exited before checkpoint-1"
            assert time.time() < deadline, "trainer wrote no checkpoint-1 within 120 s (killed)"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc_helpers.kill_tree(proc.pid)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = max(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    print("RESUMED_FROM", resumed_from, time.time())
    total = resumed_from + 2
    train.main(
        [*args, "--output_dir", str(killed), "--max_train_steps", str(total), "--resume_from_checkpoint", "latest"]
    )
    straight = tmp_path / "straight"
    train.main([*args, "--output_dir", str(straight), "--max_train_steps", str(total)])
    a = load_file(killed / f"checkpoint-{total}" / "trainable.safetensors")
    b = load_file(straight / f"checkpoint-{total}" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(killed)] == [r["loss"] for r in _rows(straight)]


def _refused(tmp_path, flags, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", *flags])
    assert not out.exists()


def test_unsupported_pipeline_class_names_the_supported_ones(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(TINY_SD3, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    _refused(
        tmp_path,
        ["--pretrained_model_name_or_path", str(other)],
        r"_class_name 'KandinskyPipeline'.*known: .*'StableDiffusion3Pipeline'.*'StableDiffusionPipeline'",
    )


def test_resolution_the_transformer_cannot_take_is_refused(tmp_path):
    _refused(
        tmp_path, ["--resolution", "30"], "--resolution: expected a multiple of the VAE downsampling factor 4, got 30"
    )
    _refused(
        tmp_path,
        ["--resolution", "68"],
        "--resolution: SD3's transformer has 16 positions per side .*pos_embed_max_size.*at most 64 px, got 68",
    )
    patched = tmp_path / "patch2"  # the tiny transformer patches 1x1; SD3's own is 2x2
    shutil.copytree(TINY_SD3, patched)
    config = json.loads((patched / "transformer" / "config.json").read_text())
    (patched / "transformer" / "config.json").write_text(json.dumps({**config, "patch_size": 2}))
    _refused(
        tmp_path,
        ["--pretrained_model_name_or_path", str(patched), "--resolution", "36"],
        "--resolution: SD3's transformer takes 2x2 patches of the latent, expected a multiple of 8 .*got 36",
    )


def test_sd3_directory_without_a_subfolder_is_refused(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(TINY_SD3, broken)
    shutil.rmtree(broken / "text_encoder_2")
    _refused(
        tmp_path,
        ["--pretrained_model_name_or_path", str(broken)],
        r"StableDiffusion3Pipeline.*missing \['text_encoder_2'\]",
    )
