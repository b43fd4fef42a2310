"""Resume safety (issue 12 items 4, 5): run-defining flags refused on resume, safe ones recorded;
corrupt checkpoints named; ``latest`` falls back; orphaned temporary directories removed; fsync."""

import json
import shutil

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
from safetensors.torch import load_file
from train_helpers import FAST

from fastpref import train
from fastpref.training import checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
BASE = [*FAST, "--checkpointing_steps", "1", "--max_train_steps", "2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    train.main([*BASE, "--output_dir", str(out)])
    return out


@pytest.fixture
def run_dir(base_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    return out


def _resume(out, *flags, steps="2"):
    return train.main(
        [
            *FAST,
            "--checkpointing_steps",
            "1",
            "--max_train_steps",
            steps,
            "--output_dir",
            str(out),
            "--resume_from_checkpoint",
            "latest",
            *flags,
        ]
    )


def test_checkpoint_stores_the_config(base_run):
    state = json.loads((base_run / "checkpoint-2" / "state.json").read_text())
    assert state["config"]["learning_rate"] == 1e-3 and state["config"]["rank"] == 4


def test_changed_run_defining_flags_are_refused_listing_each(run_dir):
    before = (run_dir / "args.json").read_text()
    flags = ["--learning_rate", "2e-3", "--seed", "3", "--loss_type", "dspo", "--train_batch_size", "2", "--rank", "8"]
    with pytest.raises(ValueError) as error:
        _resume(run_dir, *flags, steps="3")
    message = str(error.value)
    for expected in (
        "--learning_rate: 0.001 -> 0.002",
        "--seed: 0 -> 3",
        "--loss_type: 'dpo' -> 'dspo'",
        "--train_batch_size: 1 -> 2",
        "--rank: 4 -> 8",
        "checkpoint-2",
    ):
        assert expected in message, message
    assert "max_train_steps" not in message  # safe with the constant schedule
    assert (run_dir / "args.json").read_text() == before


def test_max_train_steps_refused_under_a_schedule_that_it_stretches(run_dir):
    with pytest.raises(ValueError, match="--lr_scheduler: 'constant' -> 'linear'.*--max_train_steps: 2 -> 3"):
        _resume(run_dir, "--lr_scheduler", "linear", steps="3")


def test_safe_flags_accepted_and_recorded_args_json_keeps_the_original(run_dir, capsys):
    orphan = run_dir / ".tmp-checkpoint-3-12345"
    orphan.mkdir()
    (orphan / "trainable.safetensors").write_bytes(b"half")
    _resume(run_dir, "--logging_steps", "2", steps="3")
    assert not orphan.exists()
    assert "removed 1 unfinished checkpoint directories" in capsys.readouterr().err
    args = json.loads((run_dir / "args.json").read_text())
    assert args["max_train_steps"] == 2 and args["logging_steps"] == 1 and args["resume_from_checkpoint"] is None
    record = json.loads((run_dir / "resume-2.json").read_text())
    assert record["changed"].pop("output_dir")["new"] == str(run_dir)  # the fixture copied the run
    assert record["changed"] == {"max_train_steps": {"old": 2, "new": 3}, "logging_steps": {"old": 1, "new": 2}}
    assert record["checkpoint"].endswith("checkpoint-2") and (run_dir / "checkpoint-3").is_dir()


@pytest.mark.parametrize(
    "damage,named",
    [
        (
            lambda c: (c / "trainable.safetensors").write_bytes((c / "trainable.safetensors").read_bytes()[:-100]),
            "trainable.safetensors' is not a whole safetensors file",
        ),
        (lambda c: (c / "state.json").write_text(""), "state.json' is not valid JSON"),
        (lambda c: (c / "state.json").write_text("[1]"), "state.json' lacks"),
        (lambda c: (c / "rng.safetensors").unlink(), "rng.safetensors' is missing"),
    ],
)
def test_corrupt_checkpoint_named_and_latest_falls_back(run_dir, capsys, damage, named):
    damage(run_dir / "checkpoint-2")
    with pytest.raises(ValueError, match=named):
        train.main([*BASE, "--output_dir", str(run_dir), "--resume_from_checkpoint", str(run_dir / "checkpoint-2")])
    assert checkpoint.resolve_resume("latest", run_dir) == run_dir / "checkpoint-1"
    err = capsys.readouterr().err
    assert "resuming from checkpoint-1; skipped 1 newer checkpoints that do not load: checkpoint-2" in err
    assert named in err


def test_checkpoint_of_another_rank_without_stored_config_names_the_file(run_dir):
    state_file = run_dir / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]
    state_file.write_text(json.dumps(state))
    (run_dir / "args.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-2/(trainable|optimizer).safetensors' does not fit"):
        _resume(run_dir, "--rank", "8", steps="3")


def test_every_file_and_the_directory_fsynced_before_the_rename(run_dir, monkeypatch):
    synced, real = [], checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: (synced.append(path.name), real(path)))
    tensors = load_file(run_dir / "checkpoint-2" / "trainable.safetensors")
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoint.save_checkpoint(
        run_dir,
        9,
        trainable=tensors,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        data_position=0,
        extra_files={"replay.safetensors": {"x": torch.ones(1)}},
    )
    assert set(synced[:4]) == {
        "trainable.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "replay.safetensors",
    }
    assert synced[4:] == [".tmp-checkpoint-9-" + synced[4].rsplit("-", 1)[1], run_dir.name]


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for output_dir, said in ((blocker, "which is a file"), (blocker / "sub", "whose parent")):
        with pytest.raises(ValueError, match=f"--output_dir: expected a directory.*{said}"):
            train.main([*FAST, "--output_dir", str(output_dir)])
    assert blocker.read_text() == "x"
