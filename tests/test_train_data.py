"""Preference-pair loading: tie drop, winner-first order, transforms, data-stream positions."""
import pytest

pytest.importorskip("diffusers", reason="the training tests need the train extra (diffusers), which `make test` installs where a package index is reachable")

import pytest
import torch

from fastpref.training.data import PreferencePairs, decode_image, load_pixels, pair_indices, parquet_files
from train_helpers import png_bytes, write_pairs


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
        a, b = load_pixels([_ramp_png(), _ramp_png()], 32, random_crop=False, hflip=True,
                           generator=torch.Generator().manual_seed(seed))
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
