"""SSPO's Random Checkpoint Replay: which snapshots are kept, uniform reproducible picks,
exact loading into the replay model and an exact checkpoint round trip."""

import copy

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from safetensors.torch import save_file

from fastpref.training.replay import REPLAY_FILE, CheckpointReplay


def _models(dtype=torch.float32):
    torch.manual_seed(0)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    policy[0].requires_grad_(False)  # a frozen base layer is not snapshotted
    replay = copy.deepcopy(policy).requires_grad_(False).to(dtype)
    return policy, replay


def _train(policy, value):
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.fill_(value)


def test_initial_weights_stay_and_at_most_n_snapshots_are_kept():
    policy, replay_model = _models()
    initial = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    replay = CheckpointReplay(policy, replay_model, snapshot_steps=3, num_snapshots=2, seed=0)
    for step in range(1, 13):
        _train(policy, float(step))
        replay.after_step(policy, step)
    assert replay.steps == [0, 9, 12]
    assert set(replay.pool[0]) == {"1.weight", "1.bias"}
    assert all(torch.equal(replay.pool[0][n], initial[n]) for n in initial)
    assert torch.all(replay.pool[1]["1.weight"] == 9.0) and torch.all(replay.pool[2]["1.bias"] == 12.0)
    snapshot = replay.pool[2]["1.weight"]
    _train(policy, -1.0)  # a snapshot is a copy, not a view of the live weights
    assert torch.all(snapshot == 12.0)


def test_picks_are_uniform_and_reproducible():
    policy, replay_model = _models()
    replay = CheckpointReplay(policy, replay_model, snapshot_steps=1, num_snapshots=3, seed=5)
    for step in range(1, 4):
        replay.after_step(policy, step)
    picks = [replay.pick(step) for step in range(4000)]
    counts = torch.bincount(torch.tensor(picks), minlength=4).double()
    assert counts.numel() == 4 and (counts - 1000).abs().max() < 120  # ~4 sigma of a fair draw
    again = CheckpointReplay(policy, replay_model, snapshot_steps=1, num_snapshots=3, seed=5)
    for step in range(1, 4):
        again.after_step(policy, step)
    assert [again.pick(step) for step in range(4000)] == picks
    other = CheckpointReplay(policy, replay_model, snapshot_steps=1, num_snapshots=3, seed=6)
    for step in range(1, 4):
        other.after_step(policy, step)
    assert [other.pick(step) for step in range(100)] != picks[:100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_restores_the_snapshot_exactly_in_the_replay_dtype(dtype):
    policy, replay_model = _models(dtype)
    replay = CheckpointReplay(policy, replay_model, snapshot_steps=1, num_snapshots=2, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    replay.after_step(policy, 1)
    base_before = replay_model[0].weight.clone()
    replay.load(1)
    assert torch.equal(replay_model[1].weight, policy[1].weight.detach().to(dtype))
    assert torch.equal(replay_model[0].weight, base_before)  # frozen layers are never touched
    replay.load(0)
    assert torch.equal(replay_model[1].bias, replay.pool[0]["1.bias"])


def test_checkpoint_round_trip_is_exact(tmp_path):
    policy, replay_model = _models()
    replay = CheckpointReplay(policy, replay_model, snapshot_steps=2, num_snapshots=2, seed=0)
    for step in range(1, 7):
        _train(policy, step + 0.5)
        replay.after_step(policy, step)
    tensors, steps = replay.state()
    save_file(tensors, tmp_path / REPLAY_FILE)
    fresh = CheckpointReplay(*_models(), snapshot_steps=2, num_snapshots=2, seed=0)
    fresh.restore(tmp_path, steps)
    assert fresh.steps == replay.steps == [0, 4, 6]
    for a, b in zip(fresh.pool, replay.pool, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_file({"0/1.weight": tensors["0/1.weight"]}, tmp_path / REPLAY_FILE)
    with pytest.raises(ValueError, match="does not match the trainable parameters"):
        fresh.restore(tmp_path, [0])
