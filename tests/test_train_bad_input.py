"""Bad trainer input: a clear ValueError before training, and nothing written to output_dir."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
from train_helpers import FAST, write_pairs

from fastpref import train


def _fails(tmp_path, extra, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", *extra])
    assert not out.exists()


def test_missing_data_file(tmp_path):
    _fails(tmp_path, ["--train_data_dir", str(tmp_path / "nope.parquet")], "--train_data_dir.*does not exist")


def test_malformed_data_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    _fails(tmp_path, ["--dataset_name", str(bad)], "--dataset_name: could not read .* as parquet")


def test_directory_without_parquet(tmp_path):
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, ["--train_data_dir", str(tmp_path / "empty")], "no \\*.parquet file")


@pytest.mark.parametrize("column", ["jpg_1", "label_0", "caption"])
def test_parquet_without_expected_columns(tmp_path, column):
    path = write_pairs(tmp_path / "p.parquet", [1.0, 0.0], drop_column=column)
    _fails(tmp_path, ["--train_data_dir", str(path)], f"lacks columns \\['{column}'\\]")


def test_unknown_loss_type(tmp_path):
    _fails(tmp_path, ["--loss_type", "cpo"], "--loss_type: expected one of .*'dpo'.*got 'cpo'")


def test_resume_path_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    _fails(
        tmp_path,
        ["--resume_from_checkpoint", str(tmp_path / "ckpt")],
        "--resume_from_checkpoint: expected 'latest' or a checkpoint directory",
    )


def test_resolution_not_divisible_by_vae_factor(tmp_path):
    _fails(
        tmp_path, ["--resolution", "30"], "--resolution: expected a multiple of the VAE downsampling factor 4, got 30"
    )


def test_model_directory_not_a_pipeline(tmp_path):
    _fails(tmp_path, ["--pretrained_model_name_or_path", str(tmp_path)], "--pretrained_model_name_or_path.*missing")


def test_beta_dpo_refused_with_both_conventions(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        train.main([*FAST, "--output_dir", str(out), "--beta_dpo", "2500"])
    message = str(error.value)
    assert "--beta 5000" in message and "train_diffusion_dpo.py" in message
    assert "--beta 2500" in message and "train_diffusion_dpo_sdxl.py" in message
    assert not out.exists()


def test_xformers_flag_without_xformers(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real_find_spec(name, *a)
    )
    _fails(
        tmp_path,
        ["--enable_xformers_memory_efficient_attention"],
        "--enable_xformers_memory_efficient_attention: xformers is not installed",
    )


def test_cli_prints_one_error_line(tmp_path, capsys):
    import sys

    argv = sys.argv
    sys.argv = ["fastpref-train", "--loss_type", "nope", "--output_dir", str(tmp_path / "o")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.cli()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert "fastpref-train: error: --loss_type" in capsys.readouterr().err


def test_batch_too_small_for_loss_type(tmp_path):
    _fails(
        tmp_path,
        ["--loss_type", "rpo_diagonal", "--train_batch_size", "1"],
        "--train_batch_size: --loss_type rpo_diagonal needs at least 2 pairs per process, got 1",
    )


def test_attention_backend_auto_and_required(monkeypatch):
    """No flag: SDPA unless xformers is installed and runs on CUDA; the flag requires xformers."""
    import importlib.util

    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fastpref.training.args import DEFAULT_MODEL
    from fastpref.training.models import set_attention

    unet = UNet2DConditionModel.from_pretrained(DEFAULT_MODEL, subfolder="unet")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real_find_spec(name, *a)
    )
    calls = []
    monkeypatch.setattr(
        UNet2DConditionModel,
        "enable_xformers_memory_efficient_attention",
        lambda self: (calls.append(1), (_ for _ in ()).throw(RuntimeError("no kernels")))[1],
    )
    if not torch.cuda.is_available():  # auto on the CPU: SDPA without trying xformers
        assert set_attention(unet, None) == "sdpa" and not calls
    else:  # auto on CUDA with a broken xformers: tried, warned, SDPA
        with pytest.warns(UserWarning, match="xformers is installed but cannot run here"):
            assert set_attention(unet, None) == "sdpa"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="--enable_xformers_memory_efficient_attention: xformers cannot run here"):
        set_attention(unet, True)
