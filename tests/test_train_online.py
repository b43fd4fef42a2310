"""--online_pairs_every on the bundled tiny model: the refreshed set is the policy's own samples
ranked by the reward, the reward rises over a short run, a resume continues exactly, and the
on-line flags are checked before any write."""

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fastpref import train
from fastpref.pairs import cli as pairs_cli
from fastpref.pairs.generate import sample_seed
from fastpref.training.args import DEFAULT_MODEL
from fastpref.training.config import parse_config
from fastpref.training.validation import validate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SMALL = dict(online_num_prompts=4, online_num_samples=2, online_sample_steps=4)  # a refresh of 8 images x 4 steps


def config(out, **flags):
    base = dict(
        pretrained_model_name_or_path=str(DEFAULT_MODEL),
        train_batch_size=2,
        report_to="csv",
        learning_rate=1e-3,
        output_dir=str(out),
        checkpointing_steps=1000,
    )
    return parse_config(**{**base, **flags})


def rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_refresh_raises_the_reward_over_a_short_run(tmp_path):
    out = tmp_path / "run"
    flags = dict(online_pairs_every=8, max_train_steps=9, online_num_prompts=8, online_num_samples=4)
    train.train(train.build(config(out, online_sample_steps=6, learning_rate=2e-3, train_batch_size=4, **flags)))
    logged = {int(r["step"]): r for r in rows(out) if r.get("online_reward")}
    assert sorted(logged) == [0, 8]  # a refresh at step 0 and every 8 steps, logged at its step
    rewards = [float(logged[s]["online_reward"]) for s in (0, 8)]
    assert all(float(logged[s]["online_refresh_s"]) > 0 for s in logged)
    assert rewards[1] > rewards[0] + 0.003, rewards  # the same prompts and seeds: the policy alone changed
    table = pq.read_table(out / "online_pairs" / "step-00000008.parquet").to_pydict()
    assert len(table["caption"]) == float(logged[8]["online_pairs"]) and len(table["caption"]) >= 6
    for i, p in enumerate(table["prompt_index"]):
        seeds = [sample_seed(0, p, k) for k in range(4)]  # --seed 0: the same noise at every refresh
        assert table["seed_0"][i] in seeds and table["seed_1"][i] in seeds
        assert table["label_0"][i] == (1.0 if table["score_0"][i] > table["score_1"][i] else 0.0)
    assert (out / "curves.png").is_file()
    # fastpref-pairs samples the same images (same prompts, seeds and settings): the step-0 reward is the
    # base model's, and the trained LoRA loaded with --lora_weights scores higher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(validate(config(out))[2].captions[:8]))
    argv = ["--prompts", str(prompts), "--num_samples", "4", "--num_inference_steps", "6", "--batch_size", "8"]
    base = pairs_cli.main([*argv, "--no_progress", "--output", str(tmp_path / "base.parquet")])
    assert base["reward_mean"] == pytest.approx(rewards[0], rel=1e-9)
    aligned = pairs_cli.main(
        [*argv, "--no_progress", "--lora_weights", str(out), "--output", str(tmp_path / "a.parquet")]
    )
    assert aligned["reward_mean"] > rewards[0] + 0.003


def test_resume_with_online_pairs_is_exact(tmp_path):
    flags = dict(online_pairs_every=2, **SMALL)
    straight = tmp_path / "straight"
    train.train(train.build(config(straight, max_train_steps=4, **flags)))
    resumed = tmp_path / "resumed"
    train.train(train.build(config(resumed, max_train_steps=3, checkpointing_steps=3, **flags)))
    assert sorted(p.name for p in (resumed / "online_pairs").iterdir()) == ["step-00000002.parquet"]  # pruned
    train.train(train.build(config(resumed, max_train_steps=4, resume_from_checkpoint="latest", **flags)))
    a, b = (
        load_file(straight / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [int(r["step"]) for r in rows(resumed)]
    assert steps == sorted(set(steps)) == list(range(5))  # one row per step, refreshes merged into their step's row
    # a checkpoint whose set was removed cannot resume exactly: refused before any write
    (resumed / "online_pairs" / "step-00000002.parquet").unlink()
    with pytest.raises(ValueError, match="on-line pairs of step 2 .* are missing"):
        train.build(config(resumed, max_train_steps=8, resume_from_checkpoint="latest", **flags))


def test_online_flags_checked_before_any_write(tmp_path):
    out = tmp_path / "never"
    cases = [
        (dict(reward="pickscore"), "--reward: read only with --online_pairs_every"),
        (dict(online_pairs_every=0), "--online_pairs_every: expected an integer >= 1, got 0"),
        (dict(online_pairs_every=2, online_num_samples=1), "--online_num_samples: expected an integer >= 2"),
        (dict(online_pairs_every=2, reward="clip"), "--reward clip needs a CLIP model on local disk"),
        (dict(online_pairs_every=2, online_prompts=str(tmp_path / "none.txt")), "--online_prompts: expected"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            train.build(config(out, **flags))
    assert not out.exists()
    assert np.isfinite(0.0)


def test_resume_of_a_checkpoint_older_than_the_new_flags(tmp_path):
    """A checkpoint written before the on-line and datasets flags existed resumes while they
    keep their defaults, and is refused when one is changed."""
    import json

    from fastpref.training.checkpoint import STATE_FILE, check_resume_config

    new = config(tmp_path / "out", max_train_steps=4).as_dict()
    added = ("online_pairs_every", "online_num_samples", "reward", "dataset_split", "dataset_streaming")
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"config": {k: v for k, v in new.items() if k not in added}}))
    assert check_resume_config(checkpoint, new) == {}
    with pytest.raises(ValueError, match="--online_num_samples: None -> 3"):
        check_resume_config(checkpoint, {**new, "online_num_samples": 3})
