"""The prompts of ``fastpref-pairs``: a text file (one prompt a line) or a parquet/CSV column."""

from __future__ import annotations

from pathlib import Path

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
DEFAULT_COLUMNS = ("prompt", "caption", "text")


def read_prompts(path: str | Path, column: str | None = None, argument: str = "--prompts") -> list[str]:
    """The prompts of ``path``: a ``.parquet``, ``.csv`` or ``.tsv`` table's ``column`` (default:
    the first of ``prompt``, ``caption``, ``text`` it has), else one prompt a line of a UTF-8
    text file (surrounding whitespace stripped, blank lines skipped). ValueError naming
    ``argument`` for a missing file, a missing column, a null or non-string value, or no prompt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{argument}: expected a prompts file (text, parquet or CSV), got {str(path)!r}, which is not a file"
        )
    if path.suffix.lower() in TABLE_SUFFIXES:
        import pyarrow.csv
        import pyarrow.parquet as pq

        try:
            if path.suffix.lower() == ".parquet":
                table = pq.read_table(path)
            else:
                delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
                table = pyarrow.csv.read_csv(path, parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter))
        except Exception as error:  # pyarrow raises several types for a malformed file
            raise ValueError(f"{argument}: could not read {str(path)!r} ({type(error).__name__}: {error})") from error
        name = column or next((c for c in DEFAULT_COLUMNS if c in table.column_names), None)
        if name not in table.column_names:
            wanted = repr(column) if column else f"one of {list(DEFAULT_COLUMNS)} (or --prompt_column)"
            raise ValueError(f"{argument}: {str(path)!r} has no column {wanted}; its columns are {table.column_names}")
        prompts = table.column(name).to_pylist()
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ValueError(f"{argument}: {str(path)!r} column {name!r} row {bad} is {prompts[bad]!r}, not a string")
    else:
        if column is not None:
            raise ValueError(f"--prompt_column: {str(path)!r} is a text file (one prompt a line), which has no columns")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{argument}: {str(path)!r} is not UTF-8 text ({error})") from error
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{argument}: {str(path)!r} holds no prompt")
    return prompts
