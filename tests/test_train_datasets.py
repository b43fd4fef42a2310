"""--dataset_name through the datasets library (save_to_disk directory, DatasetDict split, parquet
glob, streaming) gives the same pairs and the same batches as the plain parquet path."""

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from train_helpers import png_bytes

from fastpref import train
from fastpref.training.args import DEFAULT_MODEL
from fastpref.training.batches import LAYOUTS
from fastpref.training.config import parse_config
from fastpref.training.validation import validate

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def pairs_table(n: int, seed: int) -> pa.Table:
    """``n`` pairs of distinct 32 px PNGs with fresh random labels (ties included)."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(250)[: 2 * n]
    return pa.table(
        {
            "jpg_0": [png_bytes(int(v)) for v in values[:n]],
            "jpg_1": [png_bytes(int(v)) for v in values[n:]],
            "label_0": rng.choice([0.0, 0.5, 1.0], size=n, p=[0.45, 0.1, 0.45]).tolist(),
            "caption": [f"a {c} circle" for c in rng.choice(["red", "blue", "green"], size=n)],
            "score_0": rng.normal(size=n).tolist(),  # an extra column (fastpref-pairs writes some): ignored
        }
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    table = pairs_table(12, seed=4)
    pq.write_table(table, root / "all.parquet")
    (root / "shards").mkdir()
    pq.write_table(table.slice(0, 5), root / "shards" / "train-00.parquet")
    pq.write_table(table.slice(5), root / "shards" / "train-01.parquet")
    datasets.Dataset(table).save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset(table.slice(0, 3)), "other": datasets.Dataset(table)}).save_to_disk(
        str(root / "dict")
    )
    images = datasets.Dataset(table).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    images.save_to_disk(str(root / "images"))  # the Image feature: {"bytes", "path"} structs
    return root


def config(**flags):
    return parse_config(pretrained_model_name_or_path=str(DEFAULT_MODEL), train_batch_size=3, report_to="none", **flags)


def pairs_of(**flags):
    _, _, pairs, _ = validate(config(**flags))
    return pairs


@pytest.mark.parametrize(
    "name, flags",
    [
        ("saved", {}),
        ("images", {}),
        ("dict", {"dataset_split": "other"}),
        ("shards/train-*.parquet", {}),
        ("shards/train-*.parquet", {"dataset_streaming": True}),
        ("saved", {"dataset_streaming": True}),
        ("shards", {"dataset_streaming": True}),
    ],
)
def test_datasets_inputs_give_the_parquet_pairs(inputs, name, flags):
    reference = pairs_of(dataset_name=str(inputs / "all.parquet"))
    pairs = pairs_of(dataset_name=str(inputs / name), **flags)
    assert len(reference) == 12 - reference.num_ties >= 8
    assert (pairs.captions, pairs.winners, pairs.losers, pairs.num_ties) == (
        reference.captions,
        reference.winners,
        reference.losers,
        reference.num_ties,
    )


def test_datasets_inputs_give_the_parquet_batches(inputs):
    run = train.build(config(dataset_name=str(inputs / "all.parquet"), output_dir=str(inputs / "out")))
    for flags in (
        {"dataset_name": str(inputs / "saved")},
        {"dataset_name": str(inputs / "shards"), "dataset_streaming": True},
    ):
        pairs = pairs_of(**flags)
        for start in (0, 3, 9):  # 9: across the epoch boundary of the 11 non-tied pairs
            expected, got = run.batch(start), LAYOUTS["pairs"](pairs, list(range(start, start + 3)), run.encoders)
            for a, b in zip(expected, got, strict=True):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_datasets_input_refusals(inputs):
    with pytest.raises(ValueError, match=r"--dataset_split: .* has splits \['other', 'train'\], got 'test'"):
        pairs_of(dataset_name=str(inputs / "dict"), dataset_split="test")
    with pytest.raises(ValueError, match="--dataset_name: the glob .* matches no file"):
        pairs_of(dataset_name=str(inputs / "shards" / "none-*.parquet"))
    (inputs / "notes.txt").write_text("not a parquet file")
    with pytest.raises(ValueError, match="must match parquet files only"):
        pairs_of(dataset_name=str(inputs / "*"))
    with pytest.raises(ValueError, match=r"--dataset_name: .*\[train\]' lacks columns \['jpg_0', 'jpg_1', 'label_0'\]"):
        datasets.DatasetDict({"train": datasets.Dataset(pa.table({"caption": ["x"]}))}).save_to_disk(
            str(inputs / "bad")
        )
        pairs_of(dataset_name=str(inputs / "bad"))
