"""--fsdp (FSDP2 shards, DCP checkpoints) on the bundled tiny model. One torchrun launch of two
gloo processes (tests/fsdp_worker.py) runs every 2-process job, and also the suite's DDP KTO job
(each launch costs seconds of start-up per process); the 1-process runs go in-process.
Checked: 2 processes with FSDP2 against 1 process without it at the same global batch, both
reference modes; the tiny SDXL, SD3 (flow matching), Flux and Wan (video) pipelines on their
bundled data through the whole trainer, each in LoRA mode and with the sharded frozen reference
copy; a bitwise resume at the same world size; a kill mid-checkpoint and a resume of it on 1
process; rank 0 alone writes final weights that load."""

import csv
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import proc_helpers
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from helpers import needs_kernels
from safetensors.torch import load_file
from train_helpers import FAST

from fastpref import train
from fastpref.training.args import ASSETS, DEFAULT_MODEL
from fastpref.training.checkpoint import resolve_resume, verify_checkpoint
from fastpref.training.logging import MetricsLogger

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), needs_kernels]

# 2 micro-steps per step (the first without gradient sync); a checkpoint after every step
COMMON = [*FAST, "--gradient_accumulation_steps", "2", "--adam_epsilon", "1e-2", "--checkpointing_steps", "1"]
STEPS = ["--max_train_steps", "2"]
WORKER = Path(__file__).with_name("fsdp_worker.py")
# the families past SD1.5, each on its bundled data (pipeline, --reference): 2 steps, no
# accumulation, no checkpoints; LoRA and the sharded frozen reference copy on each
FAMILY_JOBS = tuple(
    (name, mode) for mode in ("lora", "copy") for name in ("tiny-sd3", "tiny-wan", "tiny-sdxl", "tiny-flux")
)
# LR 1e-4 (LoRA) and 1e-5 (copy: every weight moves) keep step 2's loss off its saturated ends
FAMILY_LR = {"lora": "1e-4", "copy": "1e-5"}
DENOISER_DIR = {"tiny-sdxl": "unet"}
# DDP (no --fsdp) with KTO, a row method: its batch baseline comes from fastpref.row_errors and a
# real all-reduce on 2 processes (tests/test_train_e2e.py runs DPO under DDP through `-m fastpref.train`)
KTO_DDP = [*FAST, *STEPS, "--checkpointing_steps", "2", "--loss_type", "kto", "--gradient_accumulation_steps", "2"]
KTO_DDP += ["--adam_epsilon", "1e-2"]  # --reference copy writes the denoiser here; the others: transformer


def _family_argv(name: str, mode: str) -> list[str]:
    """One family job's flags, 1 pair per micro-step per process (the 1-process run adds its own)."""
    return [*FAST, *STEPS, "--adam_epsilon", "1e-2", "--learning_rate", FAMILY_LR[mode], "--reference", mode] + [
        "--pretrained_model_name_or_path",
        str(ASSETS / name),
    ]


@pytest.fixture(autouse=True)
def _no_curves(monkeypatch):
    """No curves.png in this file's in-process runs (matplotlib, over a second a run;
    tests/test_train_e2e.py checks the plot). The worker skips it alike."""
    monkeypatch.setattr(MetricsLogger, "plot", lambda self, keys: None)


def _rows(out: Path) -> dict[int, dict]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def _torchrun_env(monkeypatch, world_size: int = 1) -> None:
    """The environment torchrun gives rank 0 of ``world_size`` processes (one process, in-process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(
        WORLD_SIZE=world_size, RANK=0, LOCAL_RANK=0, LOCAL_WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1"
    ).items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """The 2-process jobs, one torchrun launch: ``lora`` and ``copy`` straight; ``resumed`` (from
    ``lora/checkpoint-1``); one run per ``FAMILY_JOBS`` entry (``<name>-<mode>``); ``kto-ddp`` (DDP, no
    --fsdp); ``killed`` (every process killed while writing checkpoint-2), last."""
    root = tmp_path_factory.mktemp("fsdp2")
    one_batch = [*COMMON, *STEPS, "--fsdp", "--train_batch_size", "1"]
    jobs = [
        {"argv": [*one_batch, "--output_dir", str(root / "lora")]},
        {"argv": [*one_batch, "--reference", "copy", "--output_dir", str(root / "copy")]},
        {
            "argv": [*one_batch, "--output_dir", str(root / "resumed"), "--resume_from_checkpoint"]
            + [str(root / "lora" / "checkpoint-1")]
        },
        *(
            {"argv": [*_family_argv(name, mode), "--fsdp", "--output_dir", str(root / f"{name}-{mode}")]}
            for name, mode in FAMILY_JOBS
        ),
        {"argv": [*KTO_DDP, "--train_batch_size", "1", "--output_dir", str(root / "kto-ddp")]},
        {"argv": [*one_batch, "--output_dir", str(root / "killed")], "kill_at": 2},
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if torch.cuda.device_count() < 2:  # one process per GPU: fewer than 2 GPUs -> both on the CPU (gloo)
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    run = proc_helpers.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER)]
        + [str(root / "jobs.json")],
        timeout=300,
        what="torchrun --nproc_per_node 2 tests/fsdp_worker.py",
        env=env,
        check=False,
    )
    assert run.returncode != 0, "the last job kills its processes: torchrun must report the failure"
    # each job before the kill ran
    for name in ("lora", "copy", "resumed", *(f"{n}-{m}" for n, m in FAMILY_JOBS), "kto-ddp"):
        assert (root / name / "args.json").is_file(), run.stdout[-3000:]
    return root


def test_refusals_name_the_flags_before_anything_is_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    base = [*COMMON, *STEPS, "--output_dir", str(out), "--fsdp"]
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="--fsdp: needs a torchrun launch.*missing WORLD_SIZE"):
        train.main(base)
    with pytest.raises(ValueError, match="--fsdp_cpu_offload: needs --fsdp"):
        train.main([*COMMON, "--output_dir", str(out), "--fsdp_cpu_offload"])
    _torchrun_env(monkeypatch)
    for extra, message in (
        (["--cuda_graph"], "--fsdp with --cuda_graph: refused"),
        (["--mixed_precision", "fp16"], "--fsdp with --mixed_precision fp16: refused"),
        (["--loss_type", "sspo"], "--fsdp with --loss_type sspo: refused"),
        (["--online_pairs_every", "5"], "--fsdp with --online_pairs_every: refused"),
        (["--compile_denoiser"], "--fsdp with --compile_denoiser: refused"),
    ):
        with pytest.raises(ValueError, match=message):
            train.main([*base, *extra])
    assert not out.exists()


def test_two_processes_match_one_process_in_both_reference_modes(two, tmp_path):
    """The same global batch of 2 pairs: 1 pair on each of 2 FSDP2 processes against 2 pairs on
    one process without FSDP (gradients reduced over processes and over micro-steps)."""
    for mode in ("lora", "copy"):
        one = tmp_path / mode
        train.main([*COMMON, *STEPS, "--reference", mode, "--train_batch_size", "2", "--output_dir", str(one)])
        rows_one, rows_two = _rows(one), _rows(two / mode)
        assert sorted(rows_one) == sorted(rows_two) == [1, 2]
        for step in rows_one:
            for key in ("loss", "model_mse", "ref_mse", "implicit_acc", "grad_norm"):
                assert float(rows_two[step][key]) == pytest.approx(float(rows_one[step][key]), rel=1e-4, abs=1e-6)
        if mode == "lora":
            a, b = (load_file(d / "pytorch_lora_weights.safetensors") for d in (one, two / mode))
        else:
            a, b = (load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (one, two / mode))
        assert sorted(a) == sorted(b)
        moved = False
        base = load_file(DEFAULT_MODEL / "unet" / "diffusion_pytorch_model.safetensors") if mode == "copy" else {}
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
            moved = moved or (key in base and not torch.equal(a[key], base[key].to(a[key].dtype)))
        assert mode == "lora" or moved  # full fine-tuning changed the weights
        assert sorted(p.name for p in (two / mode).glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        assert (two / mode / "checkpoint-2" / "dcp" / ".metadata").is_file()


@pytest.mark.parametrize(("name", "mode"), FAMILY_JOBS, ids=[f"{n}-{m}" for n, m in FAMILY_JOBS])
def test_families_match_one_process(two, tmp_path, name, mode):
    """SD3 (flow matching), Wan (video, 5-D latents), SDXL (time-id conditioning) and Flux (packed
    latents, two kinds of blocks) through the whole trainer: 1 pair on each of 2 FSDP2 processes
    against 2 pairs on one process without FSDP, LoRA and the sharded frozen reference copy; rank 0
    alone writes the LoRA file or the denoiser directory."""
    one, sharded = tmp_path / name, two / f"{name}-{mode}"
    train.main([*_family_argv(name, mode), "--train_batch_size", "2", "--output_dir", str(one)])
    rows_one, rows_two = _rows(one), _rows(sharded)
    assert sorted(rows_one) == sorted(rows_two) == [1, 2]
    assert float(rows_one[2]["loss"]) != pytest.approx(float(rows_one[1]["loss"]), rel=1e-3)  # it trained
    for step in rows_one:
        for key in ("loss", "model_mse", "ref_mse", "implicit_acc", "grad_norm"):
            # loss and gradient scale with sigmoid of beta/2 (2500) x an MSE difference: float32
            # rounding of the MSEs (~1e-8, summed in another order over 2 processes) moves them ~1e-4
            rel = 1e-3 if key in ("loss", "grad_norm") else 1e-4
            assert float(rows_two[step][key]) == pytest.approx(float(rows_one[step][key]), rel=rel, abs=1e-6)
    assert sorted(p.name for p in sharded.glob("saved-by-rank-*")) == ["saved-by-rank-0"]
    if mode == "lora":
        a, b = (load_file(d / "pytorch_lora_weights.safetensors") for d in (one, sharded))
        assert sorted(a) == sorted(b) and any(a[k].abs().max() > 1e-5 for k in a)  # the zero-started halves moved
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-6)
        return
    # the sharded frozen copy is the pretrained model: the reference error of the LoRA job (adapters
    # off, same items, noise and timesteps) at every step
    lora_rows = _rows(two / f"{name}-lora")
    for step in rows_two:
        assert float(rows_two[step]["ref_mse"]) == pytest.approx(float(lora_rows[step]["ref_mse"]), rel=1e-5)
    folder = DENOISER_DIR.get(name, "transformer")
    a, b, base = (load_file(d / folder / "diffusion_pytorch_model.safetensors") for d in (one, sharded, ASSETS / name))
    assert sorted(a) == sorted(b) == sorted(base)
    for key in a:  # float32 rounding (a few ulps) apart ...
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    # ... while the 2 steps moved the weights 50x further (LR 1e-5: a sign error or a lost gradient
    # shard would show at this size)
    assert max((a[k] - base[k]).abs().max() for k in a) > 5e-6


def test_kto_under_ddp_matches_one_process(two, tmp_path):
    """KTO under DDP: two processes build the batch baseline from fastpref.row_errors and a real
    (gloo) all-reduce, one process from the loss's own batch baseline; the runs must agree."""
    one, ddp = tmp_path / "one", two / "kto-ddp"
    train.main([*KTO_DDP, "--train_batch_size", "2", "--output_dir", str(one)])
    rows_one, rows_two = _rows(one), _rows(ddp)
    assert sorted(rows_one) == sorted(rows_two) == [1, 2]
    for step in rows_one:
        for key in ("loss", "kl", "model_mse", "acc"):
            assert float(rows_two[step][key]) == pytest.approx(float(rows_one[step][key]), rel=1e-4, abs=1e-6)
    a = load_file(one / "checkpoint-2" / "trainable.safetensors")
    b = load_file(ddp / "checkpoint-2" / "trainable.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    assert not any(p.name.startswith(".tmp") for p in ddp.iterdir())


def test_resume_at_the_same_world_size_is_bitwise_identical(two):
    resumed, straight = two / "resumed", two / "lora"
    assert json.loads((resumed / "resume-1.json").read_text())["step"] == 1
    assert sorted(_rows(resumed)) == [2] and _rows(resumed)[2]["loss"] == _rows(straight)[2]["loss"]
    a = load_file(resumed / "pytorch_lora_weights.safetensors")
    b = load_file(straight / "pytorch_lora_weights.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_two_process_run_resumes_on_one_process(two, tmp_path, monkeypatch):
    killed, straight = two / "killed", two / "lora"
    assert [p.name for p in killed.glob(".tmp-checkpoint-*")] == [".tmp-checkpoint-2-sharded"]  # torn
    assert resolve_resume("latest", killed) == killed / "checkpoint-1"
    torn = tmp_path / "torn"  # a truncated shard: the checkpoint check names the file
    shutil.copytree(killed / "checkpoint-1", torn)
    shard = torn / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match="__1_0.distcp' is missing or truncated"):
        verify_checkpoint(torn)
    resume = [*COMMON, *STEPS, "--fsdp", "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]
    _torchrun_env(monkeypatch, world_size=3)
    with pytest.raises(ValueError, match="global batch of 2 .*which 3 processes .*do not divide"):
        train.main([*resume, "--train_batch_size", "1"])
    _torchrun_env(monkeypatch)
    with pytest.raises(ValueError, match="--train_batch_size: resuming .* on 1 processes needs --train_batch_size 2"):
        train.main([*resume, "--train_batch_size", "1"])
    train.main([*resume, "--train_batch_size", "2", "--fsdp_cpu_offload"])  # the global batch of 2 on one process
    assert not any(p.name.startswith(".tmp") for p in killed.iterdir())  # the torn one is removed
    changed = json.loads((killed / "resume-1.json").read_text())["changed"]
    assert changed["world_size"] == {"old": 2, "new": 1} and changed["fsdp_cpu_offload"]["new"] is True
    assert float(_rows(killed)[2]["loss"]) == pytest.approx(float(_rows(straight)[2]["loss"]), rel=1e-4)
    a = load_file(killed / "pytorch_lora_weights.safetensors")
    b = load_file(straight / "pytorch_lora_weights.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


def test_rank_zero_alone_writes_final_weights_which_load_into_the_pipeline(two):
    for mode in ("lora", "copy"):
        assert sorted(p.name for p in (two / mode).glob("saved-by-rank-*")) == ["saved-by-rank-0"]
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size, generator=g)
    with torch.no_grad():
        before = pipe.unet(x, torch.tensor([500]), emb).sample
        pipe.load_lora_weights(two / "lora")
        after = pipe.unet(x, torch.tensor([500]), emb).sample
        trained = UNet2DConditionModel.from_pretrained(two / "copy" / "unet")(x, torch.tensor([500]), emb).sample
    assert not torch.allclose(before, after) and not torch.allclose(before, trained)
    loaded = pipe.unet.state_dict()
    lora = load_file(two / "lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in lora if k.endswith("to_q.lora.up.weight"))
    peft_key = next(k for k in loaded if "lora_B" in k and key.split(".")[1] in k)
    assert loaded[peft_key].shape == lora[key].shape


def test_a_transformer_is_sharded_per_block_and_predicts_as_unsharded(tmp_path):
    """Flux's tiny transformer on a one-process gloo group: each of its transformer and single
    blocks is an FSDP unit, and the sharded forward equals the unsharded one."""
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from fastpref.training.fsdp import shard_module

    model = FluxTransformer2DModel.from_pretrained(DEFAULT_MODEL.parent / "tiny-flux", subfolder="transformer")
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, model.config.in_channels, generator=g)
    text = torch.randn(2, 5, model.config.joint_attention_dim, generator=g)
    kwargs = dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        pooled_projections=torch.randn(2, model.config.pooled_projection_dim, generator=g),
        timestep=torch.rand(2, generator=g),
        img_ids=torch.randn(16, 3, generator=g),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.full((2,), 3.5) if model.config.guidance_embeds else None,
    )
    with torch.no_grad():
        expected = model(**kwargs).sample
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard_module(model, init_device_mesh("cpu", (1,)), "no", cpu_offload=False)
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        assert blocks and all(isinstance(b, FSDPModule) for b in blocks) and isinstance(model, FSDPModule)
        with torch.no_grad():
            torch.testing.assert_close(model(**kwargs).sample, expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
