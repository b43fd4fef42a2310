"""fastpref-pairs on the bundled tiny Wan pipeline: the video index (video_0, video_1, label_0,
caption, scores, seeds) with the temporal reward, read by the trainer; a resume after a run
died mid-way equal to an uninterrupted run; the refusals before any write."""

import os
import signal
import subprocess
import sys
import time

import av  # noqa: F401  (the video extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pyarrow.parquet as pq
import pytest

from fastpref.pairs import cli
from fastpref.pairs.generate import sample_seed
from fastpref.pairs.sampling import load_pipeline, sample_videos
from fastpref.pairs.writer import read_spec
from fastpref.training.args import ASSETS
from fastpref.training.config import parse_config
from fastpref.training.validation import validate
from fastpref.training.video_data import read_video

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
MODEL = ASSETS / "tiny-wan"
PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]
FAST = ["--pretrained_model_name_or_path", str(MODEL), "--num_inference_steps", "2", "--no_progress"]
_calls = [0]
BLOCK = "FASTPREF_TEST_VIDEO_BLOCK"


def blocking_after_two(videos, prompts):
    """The motion-speed reward (a module:callable reward) that, when the environment sets
    ``FASTPREF_TEST_VIDEO_BLOCK``, hangs on its third call: a run that has written two part files
    (one call per part), waiting to be killed."""
    from fastpref.tiny.motion_reward import motion_speed

    _calls[0] += 1
    if _calls[0] == 3 and os.environ.get(BLOCK):
        time.sleep(600)
    return motion_speed(videos)


def speed64(clips: np.ndarray) -> np.ndarray:
    """Pixels per frame of the coloured centroid's least-squares velocity, in float64, written out
    here (chroma above 0.08 weighs each pixel)."""
    x = clips.astype(np.float64) / 255.0
    w = np.clip(x.max(-1) - x.min(-1) - 0.08, 0, None)  # [N, F, H, W]
    total = w.sum(axis=(2, 3))
    cy = (w * (np.arange(w.shape[2]) + 0.5)[:, None]).sum(axis=(2, 3)) / total
    cx = (w * (np.arange(w.shape[3]) + 0.5)).sum(axis=(2, 3)) / total
    t = np.arange(w.shape[1]) - (w.shape[1] - 1) / 2
    vx, vy = (cx * t).sum(1) / (t**2).sum(), (cy * t).sum(1) / (t**2).sum()
    return np.hypot(vx, vy)


def _clip(path) -> np.ndarray:
    c = read_video(str(path), 9)
    return ((c.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def test_video_index_from_the_tiny_wan_pipeline_is_audited_and_trains(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "pairs.parquet"
    summary = cli.main([*FAST, "--prompts", str(prompts), "--num_samples", "3", "--seed", "4", "--output", str(out)])
    table = pq.read_table(out).to_pydict()
    assert summary["pairs"] == len(table["caption"]) == 3 and table["caption"] == PROMPTS
    assert table["prompt_index"] == [0, 1, 2] and not (tmp_path / "pairs.parquet.parts").exists()
    spec = read_spec(out)
    assert (spec["reward"], spec["media"], spec["num_frames"]) == ("motion_speed", "videos", 9)  # the defaults
    files = sorted(p.name for p in (tmp_path / "pairs.parquet.videos").iterdir())
    assert files == sorted(p.split("/")[1] for p in table["video_0"] + table["video_1"])  # unpaired clips removed
    for i in range(3):
        clips = np.stack([_clip(tmp_path / table["video_0"][i]), _clip(tmp_path / table["video_1"][i])])
        assert clips.shape == (2, 9, 32, 32, 3)
        s0, s1 = speed64(clips)
        assert (table["score_0"][i], table["score_1"][i]) == pytest.approx((s0, s1), rel=1e-9)
        assert table["label_0"][i] == (1.0 if s0 > s1 else 0.0) and s0 != s1
        seeds = [sample_seed(4, i, k) for k in range(3)]
        assert seeds.index(table["seed_0"][i]) < seeds.index(table["seed_1"][i])
    # a stored clip regenerates from its prompt and seed (up to the mp4's compression)
    pipe = load_pipeline(MODEL)
    again = sample_videos(pipe, [PROMPTS[1]], [table["seed_1"][1]], num_frames=9, num_inference_steps=2, resolution=32)
    stored = _clip(tmp_path / table["video_1"][1])
    assert np.abs(again[0].astype(np.int16) - stored).mean() < 3.0
    _, _, pairs, _ = validate(
        parse_config(pretrained_model_name_or_path=str(MODEL), dataset_name=str(out), report_to="none")
    )
    assert len(pairs) == 3


def test_video_run_resumes_after_a_kill_to_the_uninterrupted_index(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = [*FAST, "--prompts", str(prompts), "--num_samples", "2", "--part_size", "1"]
    argv += ["--reward", "test_pairs_video:blocking_after_two"]
    died, parts = tmp_path / "died.parquet", tmp_path / "died.parquet.parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", BLOCK: "1", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.Popen(  # writes parts 0 and 1, then hangs in the reward of part 2 (its clips written)
        [sys.executable, "-m", "fastpref.pairs.cli", *argv, "--output", str(died)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while len(list(parts.glob("part-*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the hang
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate()
    done = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert done == ["part-00000000-00000001.parquet", "part-00000001-00000002.parquet"], err.decode()[-2000:]
    assert not died.exists()
    clips = tmp_path / "died.parquet.videos"
    (clips / ".tmp-p00000002_k00.mp4").write_bytes(b"\x00\x00 torn")  # a clip cut mid-write
    resumed = cli.main([*argv, "--output", str(died)])
    assert (resumed["prompts_before"], resumed["prompts_now"]) == (2, 1) and not list(clips.glob(".tmp-*"))
    fresh = tmp_path / "fresh.parquet"
    cli.main([*argv, "--output", str(fresh)])
    a, b = pq.read_table(died).to_pydict(), pq.read_table(fresh).to_pydict()
    assert a["prompt_index"] == [0, 1, 2] and a["score_0"] == b["score_0"] and a["score_1"] == b["score_1"]
    assert [p.split("/", 1)[1] for p in a["video_0"]] == [p.split("/", 1)[1] for p in b["video_0"]]
    for path in a["video_0"] + a["video_1"]:  # every indexed clip whole
        assert _clip(tmp_path / path).shape == (9, 32, 32, 3)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--num_frames", "8"], r"--num_frames: .* 1 \+ 4k frames .* got 8"),
        (["--reward", "colourfulness"], r"--reward: 'colourfulness' scores images and this pipeline makes videos"),
        (["--resolution", "20"], r"--resolution: .* multiple of 8 .* got 20"),
        (["--pretrained_model_name_or_path", str(ASSETS / "tiny-sd"), "--num_frames", "9"], "--num_frames: a video"),
        (["--pretrained_model_name_or_path", str(ASSETS / "tiny-sd"), "--reward", "motion_speed"], "scores videos"),
    ],
)
def test_video_refusals_before_any_write(tmp_path, flags, match):
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=match):
        cli.main([*FAST, *flags, "--output", str(out)])
    assert list(tmp_path.iterdir()) == []
