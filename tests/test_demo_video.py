"""The video demo (``fastpref-demo --family wan``, ``fastpref/demo_video.py``): a minute-sized
run end to end on the bundled tiny Wan pipeline writes its figures, the side-by-side animation
(GIF and MP4) and the frame grid; the layout helpers put reference and trained clips where they
say."""

import av  # noqa: F401  (the video extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pytest
from helpers import needs_kernels
from PIL import Image

from fastpref import demo, demo_video
from fastpref.demo_video import frame_grid, side_by_side_frames, write_animation
from fastpref.training.video_data import probe_video


def _clips(n, value, frames=3, size=4):
    out = np.zeros((n, frames, size, size, 3), np.uint8)
    out[..., 0] = value
    out[:, :, 0, 0, 1] = np.arange(frames)[None, :] * 40  # frame index in one pixel
    return out


def test_side_by_side_puts_reference_left_and_trained_right_frame_by_frame():
    frames = side_by_side_frames(_clips(3, 10), _clips(3, 200), columns=2, scale=1)
    assert frames.shape == (3, 2 * (4 + 2 + 4), 2 * (2 * (4 + 2) + 4), 3)
    assert (frames[:, 1, 1, 0] == 10).all() and (frames[:, 1, 4 + 2 + 1, 0] == 200).all()
    assert list(frames[:, 0, 0, 1]) == [0, 40, 80]  # the animation steps through the frames
    assert (frames[:, 10:, 16:] == 255).all()  # the 4th cell of a 2x2 grid is blank


def test_frame_grid_rows_alternate_reference_and_trained(tmp_path):
    grid = np.asarray(frame_grid(_clips(2, 10), _clips(2, 200), scale=1))
    red = grid[..., 0]
    assert red[1, 1] == 10 and red[4 + 1 + 1, 1] == 200  # pair 0: reference row, then trained
    assert red[1, (4 + 1) * 2 + 1] == 10  # frames left to right
    gif, mp4 = write_animation(side_by_side_frames(_clips(2, 10, size=8), _clips(2, 200, size=8)), tmp_path, "x")
    assert Image.open(gif).n_frames == 3 and probe_video(str(mp4))[0] == 3  # frames differ: none merged


@needs_kernels
def test_video_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    figures = demo.main(
        [
            "--family",
            "wan",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "1",
            "--num_samples",
            "2",
            "--num_inference_steps",
            "2",
            "--train_batch_size",
            "2",
        ]
    )
    assert figures["family"] == "wan" and figures["num_samples"] == 2 and 0.0 <= figures["win_rate"] <= 1.0
    assert figures["reward_reference"] >= 0 and figures["reward_trained"] >= 0
    for name in (
        "demo_side_by_side.gif",
        "demo_side_by_side.mp4",
        "demo_frames.png",
        "pytorch_lora_weights.safetensors",
    ):
        assert (out / name).is_file(), name
    gif = Image.open(out / "demo_side_by_side.gif")  # PIL merges equal consecutive frames, adding their durations
    durations = []
    for k in range(gif.n_frames):
        gif.seek(k)
        durations.append(gif.info["duration"])
    assert sum(durations) == 9 * 250  # 9 frames at 4 frames per second
    assert "demo_speeds.csv" in {p.name for p in out.iterdir()}
    assert "win-rate of trained over reference" in capsys.readouterr().out


def test_video_demo_defaults_and_refuses_an_image_family(tmp_path):
    args, _ = demo_video.build_parser().parse_known_args([])
    assert (args.family, args.max_train_steps) == ("wan", demo_video.DEMO_VIDEO_STEPS)
    assert demo.build_parser().parse_args([]).max_train_steps != demo_video.DEMO_VIDEO_STEPS  # its own default
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--family: the video demo takes a video family"):
        demo_video.main(["--family", "sd15", "--output_dir", str(out)])
    assert not out.exists()
