"""The tiny model's builders: tokenizer, procedural images, reward, bundled preference set."""

import io

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from transformers import CLIPTokenizer

from fastpref.tiny.reward import colourfulness
from fastpref.tiny.shapes import CAPTION_WORDS, random_dataset
from fastpref.tiny.tokenizer import build_tokenizer
from fastpref.training.args import DEFAULT_DATA, DEFAULT_MODEL


def test_tokenizer_round_trip_one_token_per_word(tmp_path):
    build_tokenizer(CAPTION_WORDS, 8).save_pretrained(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    ids = tok("a purple triangle", padding="max_length", max_length=8).input_ids
    assert tok.convert_ids_to_tokens(ids[:5]) == [
        "<|startoftext|>",
        "a</w>",
        "purple</w>",
        "triangle</w>",
        "<|endoftext|>",
    ]
    assert len(ids) == 8


def test_colourfulness_orders_grey_pastel_vivid():
    grey = np.full((4, 4, 3), 128, np.uint8)
    pastel = np.full((4, 4, 3), (230, 180, 180), np.uint8)
    dark_tint = np.full((4, 4, 3), (0, 40, 0), np.uint8)
    vivid = np.full((4, 4, 3), (230, 0, 0), np.uint8)
    scores = colourfulness(np.stack([grey, pastel, vivid, dark_tint]))
    assert scores[0] == 0.0 and 0 < scores[1] < scores[2] and scores[2] == 230 / 255
    assert scores[3] < scores[1]  # a dark tinted background is not vivid


def test_procedural_images_are_reproducible_and_varied():
    a, captions = random_dataset(16, seed=1)
    b, _ = random_dataset(16, seed=1)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert all(c.split()[0] == "a" and len(c.split()) == 3 for c in captions)
    assert np.ptp(colourfulness(a)) > 0.1


def test_bundled_preferences_follow_the_reward():
    table = pq.read_table(DEFAULT_DATA)
    assert {"jpg_0", "jpg_1", "label_0", "caption"} <= set(table.column_names)
    assert table.num_rows >= 256 and (DEFAULT_MODEL / "model_index.json").is_file()
    rows = table.slice(0, 64).to_pylist()
    for row in rows:
        s0, s1 = (colourfulness(np.asarray(Image.open(io.BytesIO(row[k])).convert("RGB"))) for k in ("jpg_0", "jpg_1"))
        assert row["label_0"] == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
