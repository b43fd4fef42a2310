"""Where the trainer's preference pairs come from: ``--dataset_name`` / ``--train_data_dir``.

- a parquet file, or a directory of ``*.parquet`` files: read with pyarrow (``data.parquet_files``);
- a glob of parquet files (``data/train-*.parquet``): its matches, sorted, read the same way;
- a directory written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose ``--dataset_split`` is taken): read with ``datasets.load_from_disk``, its Arrow table
  as the dataset presents it (``select``/``shuffle`` indices applied);
- ``--dataset_streaming``: any of those read through a ``datasets`` ``IterableDataset``, one
  pass at start, writing no cache files; the rows are then held in memory (encoded images).

Each gives ``PreferencePairs`` the same rows in the same order, so the batches, the resume and
the checks on bad rows are those of the plain parquet path. Image columns stored with the
``datasets`` ``Image`` feature (``{"bytes", "path"}`` structs) are read as their bytes.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow as pa

from .data import REQUIRED_COLUMNS, NamedTable, parquet_files

SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_glob(path: str) -> bool:
    """Whether ``path`` holds a glob wildcard."""
    return any(c in path for c in "*?[")


def _image_bytes(table: pa.Table) -> pa.Table:
    """``datasets`` ``Image`` columns (structs with a ``bytes`` field) as plain binary columns."""
    for index, field in enumerate(table.schema):
        if pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0:
            table = table.set_column(index, field.name, table.column(field.name).combine_chunks().field("bytes"))
    return table


def _load_from_disk(path: Path, split: str, argument: str):
    """The ``Dataset`` saved at ``path`` (a ``DatasetDict``: its ``split``)."""
    import datasets  # here: the plain parquet path imports no datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for an unreadable directory
        raise ValueError(
            f"{argument}: could not read {str(path)!r} as a datasets save_to_disk directory "
            f"({type(error).__name__}: {error})"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--dataset_split: {str(path)!r} has splits {sorted(loaded)}, got {split!r}")
        loaded = loaded[split]
    return loaded


def _stream(dataset, name: str) -> NamedTable:
    """One pass over an ``IterableDataset``: its rows as a table of the required columns it
    has (a missing one is then reported by ``PreferencePairs`` as for a parquet file)."""
    names = [c for c in REQUIRED_COLUMNS if dataset.column_names is None or c in dataset.column_names]
    columns: dict[str, list] = {c: [] for c in names}
    for row in dataset:
        for c in names:
            value = row.get(c)
            columns[c].append(value["bytes"] if isinstance(value, dict) and "bytes" in value else value)
    return NamedTable(name, pa.table({c: pa.array(v) if v else pa.array([], pa.null()) for c, v in columns.items()}))


def preference_sources(
    path: str | Path, argument: str = "--dataset_name", *, split: str = "train", streaming: bool = False
) -> list[Path | NamedTable]:
    """The sources of ``path`` for ``PreferencePairs`` (see the module docstring): parquet files,
    or named Arrow tables read through ``datasets``. ValueError naming ``argument`` (or
    ``--dataset_split``) for a path that is none of these."""
    text = str(path)
    directory = Path(text)
    saved = directory.is_dir() and any((directory / f).is_file() for f in SAVE_TO_DISK_FILES)
    if saved:
        dataset = _load_from_disk(directory, split, argument)
        name = f"{text}[{split}]" if (directory / "dataset_dict.json").is_file() else text
        if streaming:
            return [_stream(dataset.to_iterable_dataset(), name)]
        return [NamedTable(name, _image_bytes(dataset.with_format("arrow")[:]))]
    if is_glob(text):
        files = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        if not files:
            raise ValueError(f"{argument}: the glob {text!r} matches no file")
        if any(f.suffix != ".parquet" for f in files):
            raise ValueError(
                f"{argument}: the glob {text!r} must match parquet files only, got {[f.name for f in files]}"
            )
    else:
        files = parquet_files(path, argument)
    if not streaming:
        return files
    import datasets

    return [
        _stream(datasets.load_dataset("parquet", data_files=[str(f)], split="train", streaming=True), str(f))
        for f in files
    ]
