"""Video preference data (``fastpref/training/video_data.py``): index tables of mp4 files read
with PyAV. Ties dropped, winner first, the stated frame sampling, the defaults taken from the data,
the pair transform, and a clear error (or, with ``skip_bad_rows``, a dropped row) for each bad
input: missing column, missing file, undecodable file, too few frames, wrong types."""

import av  # noqa: F401  (the video extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastpref.training.video_data import (
    VideoPreferencePairs,
    index_files,
    load_video_pixels,
    probe_video,
    read_video,
    write_video,
)

SIZE = 16


def _clip(tag: int, frames: int, size: int = SIZE) -> np.ndarray:
    """A clip whose frame k is a flat grey of level 12 k + 2 tag (frame index and clip readable
    back through H.264's small error), with a red left half so flips show."""
    out = np.empty((frames, size, size, 3), np.uint8)
    for k in range(frames):
        out[k] = 12 * k + 2 * tag
    out[:, :, : size // 2, 0] = 250
    return out


def _levels(video: torch.Tensor) -> np.ndarray:
    """The grey level of each frame of a ``[3, F, H, W]`` clip in [-1, 1] (right half, green)."""
    return ((video[1, :, :, video.shape[-1] // 2 :].mean(dim=(-2, -1)) + 1) * 127.5).numpy()


def _index(tmp_path, labels, *, frames=9, name="index.parquet", fmt="parquet", drop=None, lengths=None):
    """An index of ``len(labels)`` pairs of clips ``(2 i, 2 i + 1)`` in ``tmp_path/videos``."""
    (tmp_path / "videos").mkdir(exist_ok=True)
    rows = {"video_0": [], "video_1": [], "label_0": [float(x) for x in labels], "caption": []}
    for i in range(len(labels)):
        for j in (0, 1):
            path = f"videos/{i}_{j}.mp4"
            n = frames if lengths is None else lengths.get((i, j), frames)
            write_video(tmp_path / path, _clip(2 * i + j, n))
            rows[f"video_{j}"].append(path)
        rows["caption"].append(f"caption {i}")
    if drop:
        del rows[drop]
    table = pa.table(rows)
    if fmt == "csv":
        import pyarrow.csv as pv

        pv.write_csv(table, tmp_path / name)
    else:
        pq.write_table(table, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_ties_dropped_winner_first(tmp_path, fmt):
    index = _index(tmp_path, [1, 0, 0.5, 1], fmt=fmt, name=f"index.{fmt}")
    pairs = VideoPreferencePairs(index_files(index))
    assert len(pairs) == 3 and pairs.num_ties == 1
    expected = [("caption 0", 0, 1), ("caption 1", 1, 0), ("caption 3", 0, 1)]  # (caption, winner col, loser col)
    for k, (caption, w, l) in enumerate(expected):
        row = int(caption.split()[1])
        got_caption, winner, loser = pairs[k]
        assert got_caption == caption
        assert winner.endswith(f"videos/{row}_{w}.mp4") and loser.endswith(f"videos/{row}_{l}.mp4")
        assert f"row {row} column 'video_{w}'" in winner.origin
    # the unpaired view (KTO): winners even, losers odd
    assert pairs.image(2) == ("caption 1", pairs.winners[1], True)
    assert pairs.image(3) == ("caption 1", pairs.losers[1], False)


def test_defaults_from_the_first_video(tmp_path):
    index = _index(tmp_path, [1, 0], frames=13)
    pairs = VideoPreferencePairs(index_files(tmp_path))  # a directory of indexes
    assert (pairs.num_frames, pairs.resolution) == (13, SIZE)
    assert probe_video(pairs.winners[0]) == (13, SIZE, SIZE)
    assert VideoPreferencePairs([index], num_frames=5).num_frames == 5


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_frame_sampling_is_frames_0_s_2s_from_the_start(tmp_path, stride):
    path = tmp_path / "clip.mp4"
    write_video(path, _clip(0, 13))
    clip = read_video(str(path), 5, stride)
    assert clip.shape == (3, 5, SIZE, SIZE) and clip.dtype == torch.float32
    assert np.abs(_levels(clip) - 12 * stride * np.arange(5)).max() < 4  # H.264's rounding only


def test_pair_transform_alike_across_frames_and_the_pair(tmp_path):
    index = _index(tmp_path, [1])
    pairs = VideoPreferencePairs([index])
    flips = []
    for seed in range(8):
        w, l = load_video_pixels(
            [pairs.winners[0], pairs.losers[0]],
            8,
            num_frames=9,
            frame_stride=1,
            random_crop=True,
            hflip=True,
            generator=torch.Generator().manual_seed(seed),
        )
        assert w.shape == l.shape == (3, 9, 8, 8)
        red_left = (w[0, :, :, :2].mean() > w[0, :, :, -2:].mean()).item()
        assert red_left == (l[0, :, :, :2].mean() > l[0, :, :, -2:].mean()).item()  # one flip for the pair
        flips.append(red_left)
        assert np.abs(_levels(w) - 12 * np.arange(9) - 0).max() < 4  # frames kept in order, winner is clip 0
        assert np.abs(_levels(l) - 12 * np.arange(9) - 2).max() < 4
    assert 0 < sum(flips) < 8  # both flip outcomes occur


def test_missing_column_names_file_and_columns(tmp_path):
    index = _index(tmp_path, [1], drop="label_0")
    with pytest.raises(ValueError, match=r"--dataset_name: .*index.parquet.* lacks columns \['label_0'\]"):
        VideoPreferencePairs([index])


def test_image_set_is_refused_with_a_hint(tmp_path):
    pq.write_table(
        pa.table({"jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0], "caption": ["c"]}), tmp_path / "p.parquet"
    )
    with pytest.raises(ValueError, match="an image preference set: this pipeline trains on videos"):
        VideoPreferencePairs([tmp_path / "p.parquet"])


def test_missing_file_named_at_start_or_skipped(tmp_path):
    index = _index(tmp_path, [1, 0])
    (tmp_path / "videos" / "1_0.mp4").unlink()
    with pytest.raises(ValueError, match=r"row 1 column 'video_0' .*1_0.mp4.*: no such file"):
        VideoPreferencePairs([index])
    pairs = VideoPreferencePairs([index], skip_bad_rows=True)
    assert len(pairs) == 1 and pairs.skipped == [
        {"file": str(index), "row": 1, "column": "video_0", "reason": "no such file"}
    ]


def test_undecodable_file_named_when_read_or_skipped(tmp_path):
    index = _index(tmp_path, [1, 0, 1])
    (tmp_path / "videos" / "2_1.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    pairs = VideoPreferencePairs([index])  # files exist: accepted until read
    with pytest.raises(ValueError, match=r"row 2 column 'video_1' .* does not decode as a video"):
        read_video(pairs.losers[2], 9)
    pairs = VideoPreferencePairs([index], skip_bad_rows=True)
    assert len(pairs) == 2 and [(s["row"], s["column"]) for s in pairs.skipped] == [(2, "video_1")]
    assert "does not decode" in pairs.skipped[0]["reason"]


def test_too_few_frames_named_with_both_counts(tmp_path):
    index = _index(tmp_path, [1, 1], lengths={(1, 1): 6})
    pairs = VideoPreferencePairs([index])
    with pytest.raises(
        ValueError,
        match=r"row 1 column 'video_1' .* has 6 frames; --num_frames 9 with --frame_stride 1 needs at least 9",
    ):
        read_video(pairs.losers[1], 9)
    with pytest.raises(ValueError, match=r"has 9 frames; --num_frames 5 with --frame_stride 3 needs at least 13"):
        read_video(pairs.losers[0], 5, 3)
    skipped = VideoPreferencePairs([index], skip_bad_rows=True)
    assert len(skipped) == 1 and skipped.skipped[0]["row"] == 1 and "has 6 frames" in skipped.skipped[0]["reason"]


def test_bad_types_and_labels_name_the_row(tmp_path):
    index = _index(tmp_path, [1, 0.3])
    with pytest.raises(ValueError, match=r"label_0 must be 0, 0.5 or 1, got 0.3 in .* row 1"):
        VideoPreferencePairs([index])
    table = pq.read_table(_index(tmp_path, [1, 0]))
    pq.write_table(table.set_column(3, "caption", pa.array([1, 2])), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"column 'caption' must hold strings; first bad row 0"):
        VideoPreferencePairs([tmp_path / "bad.parquet"])


def test_index_path_errors(tmp_path):
    with pytest.raises(ValueError, match="--train_data_dir: expected a local video index file"):
        index_files(tmp_path / "nope.csv", "--train_data_dir")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="ending in .parquet or .csv"):
        index_files(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="with none"):
        index_files(tmp_path)
