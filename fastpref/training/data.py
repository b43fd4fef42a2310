"""Pick-a-Pic-layout preference pairs: loading, tie dropping, winner-first ordering, transforms.

A preference file is a parquet table with columns ``jpg_0``, ``jpg_1`` (encoded image bytes),
``label_0`` (1 when image 0 is preferred, 0 when image 1 is, 0.5 for a tie) and ``caption``.

Column types are checked when the table is read (docs/training.md, "Bad data"): a caption that is
not a string, an image that is not bytes or a label that is not a number is a ValueError naming
the file, the column and the first bad row. An image that does not decode is an error naming the
file, row and column when a batch decodes it, or, with ``skip_bad_rows``, every image is decoded
once at start and the rows that fail (or hold a null) are dropped before the stream is formed, so
the stream is the same on resume and for any process count.
"""

import io
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
# column -> (arrow type test, what it must be, python value test)
COLUMN_TYPES = {
    "caption": (
        lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "strings",
        lambda v: isinstance(v, str),
    ),
    "jpg_0": (
        lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "bytes (binary)",
        lambda v: isinstance(v, bytes),
    ),
    "jpg_1": (
        lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "bytes (binary)",
        lambda v: isinstance(v, bytes),
    ),
    "label_0": (
        lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
        "numbers",
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    ),
}


class NamedTable(NamedTuple):
    """A preference table read by other means than a parquet file (``sources``: ``datasets``
    inputs), with the name that errors give for it."""

    name: str
    table: pa.Table


class ImageBytes(bytes):
    """Encoded image bytes that know where they came from (``origin``: file, row and column),
    so a decoding error can name them; ``column`` is the column alone (``"jpg_0"`` or
    ``"jpg_1"``: SDXL's time ids take the original size of a pair's ``jpg_0``)."""

    origin: str = ""
    column: str = ""

    @classmethod
    def at(cls, data: bytes, file: Path, row: int, column: str, argument: str) -> "ImageBytes":
        out = cls(data)
        out.origin = f"{argument}: {str(file)!r} row {row} column {column!r}"
        out.column = column
        return out


def _bad_row(values: list, check) -> int | None:
    """Index of the first value failing ``check`` (None: all pass)."""
    return next((i for i, v in enumerate(values) if not check(v)), None)


def _decodes(data: bytes) -> str | None:
    """None when ``data`` decodes fully as an image, else the reason."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        return f"{type(error).__name__}: {error}"
    return None


def parquet_files(path: str | Path, argument: str = "--train_data_dir") -> list[Path]:
    """The parquet file ``path`` or the sorted ``*.parquet`` files of directory ``path``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(
                f"{argument}: expected a parquet file or a directory of *.parquet files, "
                f"got directory {str(path)!r} with no *.parquet file"
            )
        return files
    if not path.is_file():
        raise ValueError(
            f"{argument}: expected a local parquet file or a directory of them "
            f"(hub names are not fetched; download the dataset first), "
            f"got {str(path)!r}, which does not exist"
        )
    return [path]


def _read_parquet(file: Path, argument: str) -> pa.Table:
    """The table of parquet ``file``; ValueError naming ``argument`` when it does not read."""
    try:
        return pq.read_table(file)
    except Exception as error:  # pyarrow raises several types for a malformed file
        raise ValueError(
            f"{argument}: could not read {str(file)!r} as parquet ({type(error).__name__}: {error})"
        ) from error


class PreferencePairs:
    """Non-tied pairs of a Pick-a-Pic table, winner first.

    ``pairs[i]`` is ``(caption, winner_bytes, loser_bytes)``; images stay encoded until a batch
    asks for them (``load_pixels``).
    """

    def __init__(self, files: list[Path | NamedTable], argument: str = "--train_data_dir", skip_bad_rows: bool = False):
        captions, winners, losers = [], [], []
        self.num_ties = 0
        self.skipped: list[dict] = []  # skip_bad_rows: {"file", "row", "column", "reason"} of each dropped row
        for file in files:
            if isinstance(file, NamedTable):
                file, table = file
            else:
                table = _read_parquet(file, argument)
            missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(
                    f"{argument}: {str(file)!r} lacks columns {missing}; expected the "
                    f"Pick-a-Pic columns {list(REQUIRED_COLUMNS)}, got {table.column_names}"
                )
            columns = {c: table.column(c).to_pylist() for c in REQUIRED_COLUMNS}
            bad_rows = self._check_types(file, table, columns, argument, skip_bad_rows)
            for row, (caption, label, image_0, image_1) in enumerate(
                zip(columns["caption"], columns["label_0"], columns["jpg_0"], columns["jpg_1"], strict=True)
            ):
                if row in bad_rows:
                    continue
                label = float(label)
                if label == 0.5:
                    self.num_ties += 1
                    continue
                if label not in (0.0, 1.0):
                    raise ValueError(f"{argument}: label_0 must be 0, 0.5 or 1, got {label} in {str(file)!r} row {row}")
                image_0, image_1 = (
                    ImageBytes.at(image_0, file, row, "jpg_0", argument),
                    ImageBytes.at(image_1, file, row, "jpg_1", argument),
                )
                captions.append(caption)
                winners.append(image_0 if label == 1.0 else image_1)
                losers.append(image_1 if label == 1.0 else image_0)
        if not captions:
            raise ValueError(
                f"{argument}: no non-tied preference pair in {[str(f) for f in files]}"
                + (f" ({len(self.skipped)} bad rows skipped)" if self.skipped else "")
            )
        self.captions, self.winners, self.losers = captions, winners, losers

    def _check_types(self, file: Path, table, columns: dict, argument: str, skip_bad_rows: bool) -> set[int]:
        """ValueError for a column of the wrong type or (without ``skip_bad_rows``) a row holding a
        null or a value of the wrong type; with ``skip_bad_rows`` the rows to drop (nulls and
        images that do not decode), recorded in ``self.skipped``."""
        bad: dict[int, tuple[str, str]] = {}
        for name, (arrow_ok, expected, value_ok) in COLUMN_TYPES.items():
            kind = table.schema.field(name).type
            if not (arrow_ok(kind) or pa.types.is_null(kind)) or (pa.types.is_null(kind) and not skip_bad_rows):
                row = _bad_row(columns[name], value_ok) or 0
                first = f"; first bad row {row}: {columns[name][row]!r:.80}" if columns[name] else ""
                raise ValueError(
                    f"{argument}: {str(file)!r} column {name!r} must hold {expected}, got arrow type {kind}{first}"
                )
            for row, value in enumerate(columns[name]):
                if row not in bad and not value_ok(value):
                    if not skip_bad_rows:
                        raise ValueError(
                            f"{argument}: {str(file)!r} column {name!r} must hold {expected}; first "
                            f"bad row {row}: {value!r:.80} (--skip_bad_rows drops such rows)"
                        )
                    bad[row] = (name, f"{value!r:.80} is not {expected}")
        if skip_bad_rows:
            for row in range(table.num_rows):
                for name in IMAGE_COLUMNS:
                    if row not in bad and (reason := _decodes(columns[name][row])) is not None:
                        bad[row] = (name, reason)
            self.skipped.extend(
                {"file": str(file), "row": row, "column": name, "reason": reason}
                for row, (name, reason) in sorted(bad.items())
            )
        return set(bad)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, bytes, bytes]:
        return self.captions[index], self.winners[index], self.losers[index]

    def image(self, index: int) -> tuple[str, bytes, bool]:
        """Image ``index`` of the unpaired view (``2 * len(self)`` images, for KTO):
        ``(caption, image_bytes, desirable)``; even indices are winners, odd ones losers."""
        pair, which = divmod(index, 2)
        return self.captions[pair], (self.winners, self.losers)[which][pair], which == 0


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes to ``[3, H, W]`` float32 in [-1, 1]. ValueError, naming the file, row
    and column of ``ImageBytes``, for bytes that do not decode."""
    try:
        array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
        where = getattr(data, "origin", "") or "image bytes"
        raise ValueError(
            f"{where} does not decode as an image ({type(error).__name__}: "
            f"{error}); fix or drop the row, or pass --skip_bad_rows to drop such rows at start"
        ) from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_pixels(
    images: list[bytes], resolution: int, *, random_crop: bool, hflip: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """Images resized (shorter side) to the first one's size, cropped and flipped identically.

    Returns ``[3, resolution, resolution]`` float32 tensors in [-1, 1], one per image. The crop
    offset and the flip come from ``generator`` so a run is reproducible step by step.
    """
    decoded = []
    for data in images:
        image = decode_image(data)[None]
        h, w = image.shape[-2:]
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        decoded.append(image[0])
    h, w = decoded[0].shape[-2:]
    decoded = [
        d if d.shape[-2:] == (h, w) else F.interpolate(d[None], size=(h, w), mode="bilinear", antialias=True)[0]
        for d in decoded
    ]
    offsets = torch.randint(0, 2**31 - 1, (2,), generator=generator)
    if random_crop:
        top, left = int(offsets[0]) % (h - resolution + 1), int(offsets[1]) % (w - resolution + 1)
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    flip = bool(torch.rand((), generator=generator) < 0.5) and hflip
    out = []
    for image in decoded:
        image = image[:, top : top + resolution, left : left + resolution]
        out.append(image.flip(-1) if flip else image)
    return out


def pair_indices(position: int, count: int, num_pairs: int, seed: int) -> list[int]:
    """Indices of ``count`` pairs starting at global ``position`` of the shuffled stream.

    The stream is the concatenation of per-epoch permutations seeded by ``(seed, epoch)``, so
    any position can be reproduced without iterator state (exact resume).
    """
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, num_pairs)
        perm = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(count - len(out), num_pairs - offset)
        out.extend(perm[offset : offset + take].tolist())
        position += take
    return out


SKIPPED_FILE = "skipped_rows.json"


def log_skipped_rows(skipped: tuple[dict, ...] | list[dict], output_dir: str | Path) -> None:
    """``--skip_bad_rows`` (rank 0, once): how many and which rows were dropped, on stderr and in
    ``<output_dir>/skipped_rows.json`` (``{"count": n, "rows": [{"file", "row", "column", "reason"}]}``)."""
    rows = list(skipped)
    (Path(output_dir) / SKIPPED_FILE).write_text(json.dumps({"count": len(rows), "rows": rows}, indent=1))
    shown = ", ".join(f"{Path(r['file']).name} row {r['row']} ({r['column']})" for r in rows[:10])
    more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
    print(
        f"fastpref-train: --skip_bad_rows: skipped {len(rows)} bad rows{': ' + shown + more if rows else ''} "
        f"(listed in {Path(output_dir) / SKIPPED_FILE})",
        file=sys.stderr,
    )
