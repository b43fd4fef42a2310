"""Preference-pair loading: tie drop, winner-first order, transforms, data-stream positions."""

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from train_helpers import png_bytes, write_pairs

from fastpref.training.data import PreferencePairs, decode_image, load_pixels, pair_indices, parquet_files


def test_ties_dropped_and_winner_first(tmp_path):
    path = write_pairs(tmp_path / "p.parquet", [1.0, 0.0, 0.5, 0.0])
    pairs = PreferencePairs(parquet_files(path))
    assert len(pairs) == 3 and pairs.num_ties == 1
    # pair 0: image 0 won; pairs 1 and 3: image 1 won, so it is swapped to the front
    assert pairs[0] == ("caption 0", png_bytes(0), png_bytes(5))
    assert pairs[1] == ("caption 1", png_bytes(15), png_bytes(10))
    assert pairs[2] == ("caption 3", png_bytes(35), png_bytes(30))


def test_directory_of_parquet_files(tmp_path):
    write_pairs(tmp_path / "a.parquet", [1.0])
    write_pairs(tmp_path / "b.parquet", [0.0, 1.0])
    assert len(PreferencePairs(parquet_files(tmp_path))) == 3


def test_all_ties_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no non-tied"):
        PreferencePairs(parquet_files(write_pairs(tmp_path / "p.parquet", [0.5, 0.5])))


def test_label_outside_pick_a_pic_values(tmp_path):
    with pytest.raises(ValueError, match="label_0 must be 0, 0.5 or 1, got 0.3"):
        PreferencePairs(parquet_files(write_pairs(tmp_path / "p.parquet", [0.3])))


def test_pair_pixels_layout_range_and_shared_flip():
    winner, loser = png_bytes(255, size=40), png_bytes(0, size=40)
    w, l = load_pixels([winner, loser], 32, random_crop=True, hflip=True, generator=torch.Generator().manual_seed(0))
    assert w.shape == l.shape == (3, 32, 32) and w.dtype == torch.float32
    assert torch.allclose(w[0], torch.ones(32, 32)) and torch.allclose(l[0], -torch.ones(32, 32))
    # an asymmetric image: the flip decision is drawn once and applied to both images
    img = decode_image(png_bytes(0))
    assert img.shape == (3, 32, 32)
    flips = set()
    for seed in range(8):
        a, b = load_pixels(
            [_ramp_png(), _ramp_png()], 32, random_crop=False, hflip=True, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(a, b)
        flips.add(bool(a[0, 0, 0] > a[0, 0, -1]))
    assert flips == {True, False}


def _ramp_png():
    import io

    import numpy as np
    from PIL import Image

    image = np.zeros((32, 32, 3), np.uint8)
    image[..., 0] = np.arange(32, dtype=np.uint8)[None, :] * 8
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pair_indices_are_epoch_permutations_and_position_addressable():
    stream = pair_indices(0, 20, 7, seed=3)
    assert sorted(stream[:7]) == list(range(7)) and sorted(stream[7:14]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a new permutation per epoch
    assert pair_indices(9, 5, 7, seed=3) == stream[9:14]
    assert pair_indices(0, 7, 7, seed=4) != stream[:7]


def _table(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = {
        "jpg_0": [png_bytes(10 * i) for i in range(4)],
        "jpg_1": [png_bytes(10 * i + 5) for i in range(4)],
        "label_0": [1.0, 0.0, 1.0, 0.0],
        "caption": [f"caption {i}" for i in range(4)],
    }
    pq.write_table(pa.table({**base, **columns}), path)
    return path


@pytest.mark.parametrize(
    "column,values,expected",
    [
        ("caption", [1, 2, 3, 4], "column 'caption' must hold strings, got arrow type int64; first bad row 0"),
        ("caption", ["a", "b", None, "d"], "column 'caption' must hold strings; first bad row 2"),
        ("jpg_1", ["x", "y", "z", "w"], "column 'jpg_1' must hold bytes"),
        ("label_0", ["1", "0", "1", "0"], "column 'label_0' must hold numbers"),
        ("label_0", [1.0, None, 1.0, 0.0], "column 'label_0' must hold numbers; first bad row 1"),
    ],
)
def test_column_types_checked_up_front_naming_file_column_and_row(tmp_path, column, values, expected):
    path = _table(tmp_path / "bad.parquet", **{column: values})
    with pytest.raises(ValueError, match="bad.parquet") as error:
        PreferencePairs(parquet_files(path))
    assert expected in str(error.value)


def test_undecodable_image_names_file_row_and_column(tmp_path):
    path = _table(tmp_path / "bad.parquet", jpg_0=[png_bytes(0), png_bytes(10), b"not an image", png_bytes(30)])
    pairs = PreferencePairs(parquet_files(path), "--dataset_name")
    decode_image(pairs[0][1])
    with pytest.raises(ValueError, match=r"--dataset_name: '.*bad.parquet' row 2 column 'jpg_0' does not decode"):
        decode_image(pairs[2][1])  # label 1: jpg_0 is the winner


def test_skip_bad_rows_drops_undecodable_and_null_rows_up_front(tmp_path):
    truncated = png_bytes(20)[:40]
    path = _table(tmp_path / "bad.parquet", jpg_1=[png_bytes(5), None, truncated, png_bytes(35)])
    with pytest.raises(ValueError, match="row 1"):
        PreferencePairs(parquet_files(path))
    pairs = PreferencePairs(parquet_files(path), skip_bad_rows=True)
    assert len(pairs) == 2 and [pairs[i][0] for i in range(2)] == ["caption 0", "caption 3"]
    assert [(s["row"], s["column"]) for s in pairs.skipped] == [(1, "jpg_1"), (2, "jpg_1")]
    assert all(s["file"] == str(path) for s in pairs.skipped)


def test_trainer_skip_bad_rows_logs_once_and_writes_skipped_rows_json(tmp_path, capsys):
    import json

    from train_helpers import FAST

    from fastpref import train

    path = _table(tmp_path / "bad.parquet", jpg_0=[png_bytes(0), b"\x89PNG broken", png_bytes(20), png_bytes(30)])
    out = tmp_path / "out"
    flags = [*FAST, "--dataset_name", str(path), "--max_train_steps", "1", "--output_dir", str(out)]
    with pytest.raises(ValueError, match=r"bad.parquet' row 1 column 'jpg_0' does not decode"):
        train.main([*flags, "--seed", "2"])  # seed 2: the first pair drawn is row 1
    train.main([*flags, "--skip_bad_rows"])
    assert capsys.readouterr().err.count("--skip_bad_rows: skipped 1 bad rows: bad.parquet row 1 (jpg_0)") == 1
    record = json.loads((out / "skipped_rows.json").read_text())
    assert record["count"] == 1 and record["rows"][0]["row"] == 1 and record["rows"][0]["column"] == "jpg_0"
