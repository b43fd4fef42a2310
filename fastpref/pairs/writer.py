"""Output formats of ``fastpref-pairs`` and the atomic part files that make a run resumable.

``FORMATS`` maps an output kind to its format; images have ``ImagePairsFormat`` (the trainer's
Pick-a-Pic parquet); videos ``video.VideoPairsFormat`` (the video index), registered by
``fastpref.pairs.video`` under ``"video"``.

A run writes ``<output>.parts/``: ``spec.json`` (what the run makes: model, prompts digest,
reward, seeds, sampling settings) and one ``part-<first>-<end>.parquet`` per chunk of prompts,
each written under a temporary name and renamed into place, so a part is either whole or
absent. A killed run started again with the same spec skips the chunks whose part exists;
a different spec is refused. The last step concatenates the parts into ``<output>`` (again
through a temporary file and a rename), with the spec in the parquet metadata, and removes
the parts directory.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPEC_KEY = b"fastpref.pairs"
SPEC_FILE = "spec.json"
PART = re.compile(r"part-(\d{8})-(\d{8})\.parquet")


PAIR_FIELDS = [
    ("label_0", pa.float64()),
    ("caption", pa.string()),
    ("score_0", pa.float64()),
    ("score_1", pa.float64()),
    ("seed_0", pa.int64()),
    ("seed_1", pa.int64()),
    ("prompt_index", pa.int64()),
]
"""The columns after the two media columns, shared by every pairs format: the label, the caption,
and for audit and regeneration each sample's reward and seed and its prompt's line."""


class ImagePairsFormat:
    """Image pairs in the Pick-a-Pic layout the trainer reads (``fastpref.training.data``):
    ``jpg_0``, ``jpg_1`` (encoded images; JPEG quality 95 like Pick-a-Pic, or PNG),
    ``label_0`` (1.0: image 0 preferred, 0.0: image 1, 0.5: tie), ``caption``; and for audit and
    regeneration ``score_0``, ``score_1`` (the reward of each image as stored), ``seed_0``,
    ``seed_1`` (each image's sampling seed) and ``prompt_index`` (its line in the prompts file)."""

    kind = "image"
    SCHEMA = pa.schema([("jpg_0", pa.binary()), ("jpg_1", pa.binary()), *PAIR_FIELDS])

    def __init__(self, image_format: str = "jpeg", quality: int = 95):
        if image_format not in ("jpeg", "png"):
            raise ValueError(f"--image_format: expected 'jpeg' or 'png', got {image_format!r}")
        self.image_format, self.quality = image_format, quality

    def encode(self, image: np.ndarray) -> bytes:
        """One ``[H, W, 3]`` uint8 image as JPEG or PNG bytes."""
        from PIL import Image

        buffer = io.BytesIO()
        options = {"quality": self.quality} if self.image_format == "jpeg" else {}
        Image.fromarray(image).save(buffer, format=self.image_format.upper(), **options)
        return buffer.getvalue()

    def decode(self, blobs: list[bytes]) -> np.ndarray:
        """Encoded images (one size) -> ``[N, H, W, 3]`` uint8, as the trainer will read them."""
        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])

    def table(self, rows: dict[str, list]) -> pa.Table:
        """The rows (column -> values, ``SCHEMA``'s columns) as a table of ``SCHEMA``."""
        return pa.table({f.name: pa.array(rows[f.name], f.type) for f in self.SCHEMA}, schema=self.SCHEMA)


FORMATS = {"image": ImagePairsFormat}
"""Output kind -> format class (``"video"``: added when ``fastpref.pairs.video`` is imported)."""


def output_format(kind: str, **options):
    """The format of output ``kind`` (``FORMATS``); ValueError naming the kinds there are."""
    if kind not in FORMATS:
        raise ValueError(f"no preference-file writer for {kind!r} outputs; writers exist for {sorted(FORMATS)}")
    return FORMATS[kind](**options)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(table: pa.Table, path: Path, spec: dict | None = None) -> None:
    """``table`` to parquet ``path`` through a temporary file renamed into place (fsynced), so
    ``path`` is never torn; ``spec`` is stored in the file's metadata under ``SPEC_KEY``."""
    if spec is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), SPEC_KEY: json.dumps(spec).encode()})
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_spec(path: Path) -> dict | None:
    """The spec stored in a preference file written by ``write_atomic`` (None: none stored)."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[SPEC_KEY]) if SPEC_KEY in metadata else None


def spec_differences(old: dict, new: dict) -> str:
    """``key: old -> new`` for each key whose value differs ('' when none)."""
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


class PartStore:
    """The part files of a run making ``output`` with ``spec`` (see the module docstring)."""

    def __init__(self, output: str | Path, spec: dict):
        self.output, self.spec = Path(output), spec
        self.parts = self.output.with_name(self.output.name + ".parts")

    def check(self, overwrite: bool = False) -> str:
        """What a run would do, before any work: ``"done"`` (``output`` exists with this spec),
        ``"resume"`` (parts of this spec exist) or ``"fresh"``. ValueError naming ``--output`` for
        an existing output or parts of another spec (unless ``overwrite``), or an output path
        that is a directory."""
        if self.output.is_dir():
            raise ValueError(f"--output: expected a parquet file path, got {str(self.output)!r}, a directory")
        if overwrite:
            return "fresh"
        if self.output.exists():
            try:
                old = read_spec(self.output)
            except Exception as error:  # not a parquet file
                raise ValueError(
                    f"--output: {str(self.output)!r} exists and is not a fastpref-pairs file ({error}); "
                    f"pass --overwrite to replace it"
                ) from error
            if old == self.spec:
                return "done"
            changed = spec_differences(old, self.spec) if old else "it holds no fastpref-pairs spec"
            raise ValueError(
                f"--output: {str(self.output)!r} exists from another run ({changed}); pass --overwrite to replace it"
            )
        spec_file = self.parts / SPEC_FILE
        if spec_file.is_file():
            old = json.loads(spec_file.read_text())
            if old != self.spec:
                raise ValueError(
                    f"--output: {str(self.parts)!r} holds the parts of an unfinished run with other settings "
                    f"({spec_differences(old, self.spec)}); rerun with those settings to finish it, or pass "
                    f"--overwrite to start afresh"
                )
            return "resume"
        return "fresh"

    def start(self, overwrite: bool = False) -> None:
        """Create the parts directory with ``spec.json`` (``overwrite``: remove the old output and
        parts first); remove temporary files a killed run left."""
        if overwrite:
            if self.output.exists():
                self.output.unlink()
            shutil.rmtree(self.parts, ignore_errors=True)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        for leftover in self.parts.glob(".tmp-*"):
            leftover.unlink()
        spec_file = self.parts / SPEC_FILE
        if not spec_file.is_file():
            tmp = self.parts / f".tmp-{SPEC_FILE}"
            tmp.write_text(json.dumps(self.spec, indent=1))
            os.replace(tmp, spec_file)

    def part_path(self, first: int, end: int) -> Path:
        """The part of prompts ``first..end-1``."""
        return self.parts / f"part-{first:08d}-{end:08d}.parquet"

    def done(self) -> set[tuple[int, int]]:
        """``(first, end)`` of every part already written."""
        return {(int(m[1]), int(m[2])) for p in self.parts.glob("part-*.parquet") if (m := PART.fullmatch(p.name))}

    def write_part(self, first: int, end: int, table: pa.Table) -> None:
        """The rows of prompts ``first..end-1``, atomically."""
        write_atomic(table, self.part_path(first, end))

    def finish(self, chunks: list[tuple[int, int]], schema: pa.Schema) -> pa.Table:
        """Concatenate the parts of ``chunks`` (in order) into ``output`` with the spec in its
        metadata, then remove the parts directory; returns the table."""
        tables = [pq.read_table(self.part_path(first, end)) for first, end in chunks]
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        write_atomic(table, self.output, self.spec)
        shutil.rmtree(self.parts)
        return table
