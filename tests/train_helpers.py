"""Helpers of the training tests: tiny Pick-a-Pic tables and short trainer runs."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fastpref.training.args import DEFAULT_MODEL

FAST = ["--pretrained_model_name_or_path", str(DEFAULT_MODEL),
        "--train_batch_size", "1", "--report_to", "none", "--learning_rate", "1e-3"]


def png_bytes(value: int, size: int = 32) -> bytes:
    """A uniform ``size`` x ``size`` PNG whose red channel is ``value``."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = value
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(path, labels, captions=None, drop_column=None):
    """A parquet of pairs ``(png(10 i), png(10 i + 5))`` with the given ``label_0`` values."""
    columns = {
        "jpg_0": [png_bytes(10 * i) for i in range(len(labels))],
        "jpg_1": [png_bytes(10 * i + 5) for i in range(len(labels))],
        "label_0": [float(x) for x in labels],
        "caption": captions or [f"caption {i}" for i in range(len(labels))],
    }
    if drop_column:
        del columns[drop_column]
    pq.write_table(pa.table(columns), path)
    return path
