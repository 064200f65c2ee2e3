"""Streaming readers: JSONL, JSON arrays, CSV and Parquet files -> `(line, record)` pairs.

Part of `preprocess-sft` (ftpipe/data/preprocess_sft.py). JSONL and Parquet are read a line / a
batch at a time, so a million-row file never sits in memory whole; a JSON array (alpaca JSON,
a Label Studio export) is decoded element by element from the file's text. A row that cannot be
parsed comes back as a `RowError` in place of the record; a problem with the whole file (not
UTF-8, truncated, not Parquet, a missing mapped column) raises `InputError` (exit 2).

    ftpipe preprocess-sft --config debug_config.yaml --source data/my.csv
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftpipe.core.errors import InputError
from ftpipe.data.formats import RowError

# Every reader yields (line, record or RowError, the line's JSON text when it is one JSONL line).
Progress = Callable[[int, int], None]  # (done, total): bytes for text files, rows for Parquet
JSON_CELLS = ("messages", "conversations", "history", "tools")  # CSV cells that may hold JSON
UTF8_HINT = "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"


@dataclass
class Source:
    """One input file as the user named it (for messages) and its absolute path."""

    path: Path
    name: str  # project-relative, shown in every message


def container_of(source: Source) -> str:
    """The file type: `csv`, `parquet`, `json` (one array) or `jsonl`.

    Raises:
        InputError: missing, empty or not-UTF-8 start of file.
    """
    suffix = source.path.suffix.lower()
    if not source.path.is_file():
        raise InputError(f"{source.name}: dataset file not found", hint="check data.source (or pass --source PATH)")
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    with open(source.path, "rb") as fh:
        head = fh.read(4096)
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        raise InputError(f"{source.name}: the file is empty", hint="check data.source")
    if text[:1] == b"[":
        return "json"
    if text[:1] == b"{":
        return "jsonl"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut by the 4 KiB read
            raise _not_utf8(source, head, exc.start) from None
    raise InputError(
        f"{source.name}:1: not JSON, JSONL, CSV or Parquet (the file starts with {text[:12]!r})",
        hint="pass --format, or convert the file to JSONL",
    )


def _not_utf8(source: Source, data: bytes, pos: int, line_offset: int = 0) -> InputError:
    line = line_offset + data.count(b"\n", 0, pos) + 1
    column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    return InputError(
        f"{source.name}:{line}: not UTF-8 text (byte 0x{data[pos]:02x} at column {column})", hint=UTF8_HINT
    )


class Unparsed:
    """Stands in for the record of a JSONL line whose parsing was deferred (`read_jsonl(parse=False)`):
    `parse_jsonl_line` turns it into the record later, possibly in a worker process."""

    __slots__ = ("last",)

    def __init__(self, last: bool) -> None:
        self.last = last  # the file's last line, with no newline after it: a parse error means truncation

    def __reduce__(self):
        return (Unparsed, (self.last,))


def parse_jsonl_line(source_name: str, number: int, text: str, last: bool) -> Any:
    """The record of one JSONL line, or a `RowError` when it is not valid JSON.

    Raises:
        InputError: the line is the file's unterminated last line and not valid JSON (truncated file).
    """
    try:
        return json.loads(text)
    except RecursionError:
        return RowError("<line>", "not valid JSON: nested too deeply")
    except json.JSONDecodeError as exc:
        if last:
            raise InputError(
                f"{source_name}:{number}: truncated JSON: the file ends inside a record ({exc.msg})",
                hint="the file was cut short: export or copy it again",
            ) from None
        return RowError("<line>", f"not valid JSON: {exc.msg} at column {exc.colno}")


def read_jsonl(source: Source, progress: Progress | None = None, parse: bool = True) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, record, text)` from a JSONL file, one line at a time.

    A line that is not valid JSON yields a `RowError`; a last line cut in the middle (no newline,
    invalid JSON) raises `InputError`: the file was truncated. With `parse=False` the record is an
    `Unparsed` marker and `parse_jsonl_line` does that work later (in preprocess workers).
    """
    total = source.path.stat().st_size
    done = 0
    with open(source.path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            done += len(raw)
            if progress is not None and number % 4096 == 0:
                progress(done, total)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(source, raw, exc.start, number - 1) from None
            if not text.strip():
                continue
            last = not raw.endswith(b"\n") and done == total
            if not parse:
                yield number, Unparsed(last), text
                continue
            record = parse_jsonl_line(source.name, number, text, last)
            yield number, record, (None if isinstance(record, RowError) else text)
    if progress is not None:
        progress(total, total)


def read_json_array(source: Source, progress: Progress | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, element)` from a file holding one JSON array (line = where the element starts).

    Raises:
        InputError: not UTF-8, truncated, or invalid JSON (one bad element breaks the whole array).
    """
    data = source.path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(source, data, exc.start) from None
    decoder = json.JSONDecoder()
    total = len(text)
    pos = text.index("[") + 1
    line, counted = 1, 0

    def skip_ws(i: int) -> int:
        while i < total and text[i] in " \t\r\n":
            i += 1
        return i

    def where(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip_ws(pos)
    if pos < total and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        if pos >= total:
            raise _truncated(source, where(total))
        try:
            element, end = decoder.raw_decode(text, pos)
        except RecursionError:
            raise InputError(
                f"{source.name}:{where(pos)}: invalid JSON: an element is nested too deeply",
                hint="fix the file (a JSON array is parsed as a whole); JSONL drops only bad lines",
            ) from None
        except json.JSONDecodeError as exc:
            if skip_ws(exc.pos) >= total:
                raise _truncated(source, where(total)) from None
            raise InputError(
                f"{source.name}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}",
                hint="fix the file (a JSON array is parsed as a whole); JSONL drops only bad lines",
            ) from None
        yield where(pos), element, None
        pos = skip_ws(end)
        if progress is not None:
            progress(pos, total)
        if pos >= total:
            raise _truncated(source, where(total))
        if text[pos] == "]":
            if skip_ws(pos + 1) < total:
                raise InputError(f"{source.name}:{where(pos + 1)}: invalid JSON: extra data after the array")
            return
        if text[pos] != ",":
            raise InputError(
                f"{source.name}:{where(pos)}: invalid JSON: expected ',' or ']' after an element, got {text[pos]!r}"
            )
        pos += 1


def _truncated(source: Source, line: int) -> InputError:
    return InputError(
        f"{source.name}:{line}: truncated JSON: the file ends before the closing ']'",
        hint="the file was cut short: export or copy it again",
    )


def _mapped(source: Source, header: list[str], columns: dict[str, str]) -> dict[str, str]:
    """{our field: file column}: the config mapping plus every unmapped column under its own name."""
    missing = [f"data.columns.{k}: column {v!r} is not in the header" for k, v in columns.items() if v not in header]
    if missing:
        raise InputError(
            f"{source.name}:1: {missing[0]} (columns: {', '.join(header)})", hint="fix data.columns"
        )
    mapping = {name: name for name in header if name not in columns.values()}
    mapping.update(columns)
    return mapping


def _cell(name: str, value: Any) -> Any:
    if value == "" or value is None:
        return None
    if name in JSON_CELLS and isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
    return value


def read_csv(source: Source, columns: dict[str, str], progress: Progress | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, record)` from a CSV/TSV file with a header row, columns renamed by `columns`.

    Empty cells count as absent; cells of JSON columns (messages, conversations, history, tools)
    holding JSON are decoded.
    """
    total = source.path.stat().st_size
    delimiter = "\t" if source.path.suffix.lower() == ".tsv" else ","
    done = 0

    def lines(fh) -> Iterator[str]:
        # Decode line by line so a bad byte is reported on its own line.
        nonlocal done
        for number, raw in enumerate(fh, start=1):
            done += len(raw)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(source, raw, exc.start, number - 1) from None

    with open(source.path, "rb") as fh:
        reader = csv.reader(lines(fh), delimiter=delimiter)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise InputError(f"{source.name}: the file is empty", hint="check data.source") from None
            mapping = _mapped(source, header, columns)
            index = {name: header.index(col) for name, col in mapping.items()}
            line = reader.line_num
            for cells in reader:
                start, line = line + 1, reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield start, RowError("<row>", f"{len(cells)} cells but the header has {len(header)} columns"), None
                    continue
                yield start, {name: _cell(name, cells[i]) for name, i in index.items()}, None
                if progress is not None and start % 4096 == 0:
                    progress(done, total)
        except csv.Error as exc:
            raise InputError(f"{source.name}:{reader.line_num}: invalid CSV: {exc}") from None
    if progress is not None:
        progress(total, total)


def read_parquet(source: Source, columns: dict[str, str], progress: Progress | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(row number, record)` from a Parquet file, a batch at a time, columns renamed."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"{source.name}: not a Parquet file ({type(exc).__name__}: {exc})") from None
    header = pf.schema_arrow.names
    mapping = _mapped(source, header, columns)
    total = pf.metadata.num_rows
    number = 0
    for batch in pf.iter_batches(batch_size=8192, columns=sorted(set(mapping.values()))):
        data = batch.to_pydict()
        cols = {name: data[col] for name, col in mapping.items()}
        for i in range(batch.num_rows):
            number += 1
            yield number, {name: _cell(name, values[i]) for name, values in cols.items()}, None
        if progress is not None:
            progress(number, total)
