"""Streaming readers: JSONL, JSON arrays, CSV and Parquet files -> `(line, record)` pairs.

Part of `preprocess-sft` (ftpipe/data/preprocess_sft.py). JSONL and Parquet are read a line / a
batch at a time, so a million-row file never sits in memory whole; a JSON array (alpaca JSON,
a Label Studio export) is decoded element by element from the file's text. `.gz`, `.bz2` and
`.zst` files are decompressed as they stream (gzip, bz2, zstandard), the type read from the name
before that suffix (`train.jsonl.gz`). A row that cannot be parsed, or is bigger than
`preprocess.max_row_bytes` (checked before it is parsed), comes back as a `RowError` in place of
the record; a problem with the whole file (not UTF-8, truncated, corrupt compression, not
Parquet, a missing mapped column) raises `InputError` (exit 2).

    ftpipe preprocess-sft --config debug_config.yaml --source data/my.csv
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftpipe.core.errors import InputError
from ftpipe.data.formats import RowError

# Every reader yields (line, record or RowError, the line's JSON text when it is one JSONL line).
Progress = Callable[[int, int], None]  # (done, total): bytes for text files, rows for Parquet
JSON_CELLS = ("messages", "conversations", "history", "tools")  # CSV cells that may hold JSON
UTF8_HINT = "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
NO_LIMIT = sys.maxsize


@dataclass(frozen=True)
class Source:
    """One input file as the user named it (for messages) and its absolute path."""

    path: Path
    name: str  # project-relative, shown in every message

    @classmethod
    def configured(cls, project, value: str) -> Source:
        """The file a config key names (relative to the project), named as the project shows it."""
        path = project.resolve(value)
        return cls(path, project.rel(path))


def train_val_sources(project, main: Source, val_source: str | None) -> list[tuple[str, Source]]:
    """What a preprocess stage reads: ("train", main) and, when the config names a separate
    validation file, ("val", that file)."""
    sources = [("train", main)]
    if val_source:
        sources.append(("val", Source.configured(project, val_source)))
    return sources


def compression_of(path: Path) -> str | None:
    """`gzip`, `bz2`, `zstd` from the file name's last suffix, else None."""
    return COMPRESSION.get(path.suffix.lower())


def _decompress_errors(kind: str) -> tuple[type[BaseException], ...]:
    import zlib

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    if kind == "zstd":
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


@contextlib.contextmanager
def open_bytes(source: Source) -> Iterator[tuple[Any, Any]]:
    """`(stream, raw)`: the file's (decompressed) bytes, and the file itself (its `tell()` is the
    progress through a compressed file).

    Raises:
        InputError: the compressed data is corrupt or cut short.
    """
    kind = compression_of(source.path)
    with open(source.path, "rb") as raw:
        if kind is None:
            yield raw, raw
            return
        if kind == "gzip":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif kind == "bz2":
            stream = bz2.BZ2File(raw, "rb")
        else:
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
            stream = io.BufferedReader(reader, 1 << 16)
        try:
            yield stream, raw
        except _decompress_errors(kind) as exc:
            raise InputError(
                f"{source.name}: not valid {kind} data, or the file is cut short ({type(exc).__name__}: {exc})",
                hint="the file is damaged: compress, export or copy it again",
            ) from None


def container_of(source: Source) -> str:
    """The file type: `csv`, `parquet`, `json` (one array) or `jsonl` (a `.gz`/`.bz2`/`.zst` suffix
    is looked through).

    Raises:
        InputError: missing, empty or not-UTF-8 start of file; compressed Parquet; corrupt compression.
    """
    path = source.path
    if not path.is_file():
        raise InputError(f"{source.name}: dataset file not found", hint="check data.source (or pass --source PATH)")
    kind = compression_of(path)
    suffix = (path.with_suffix("") if kind else path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        if kind:
            raise InputError(f"{source.name}: Parquet compresses its own columns; a {kind}-compressed Parquet file "
                             "is not read", hint=f"decompress it first, e.g. {_tool(kind)} -d {source.name}")
        return "parquet"
    with open_bytes(source) as (fh, _):
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


def _tool(kind: str) -> str:
    return {"gzip": "gzip", "bz2": "bzip2", "zstd": "zstd"}[kind]


def _too_large(size: int, limit: int) -> RowError:
    return RowError("<row>", f"{size / 2**20:.1f} MiB, over preprocess.max_row_bytes ({limit / 2**20:.1f} MiB)",
                    reason="too_large")


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


def read_jsonl(source: Source, progress: Progress | None = None, parse: bool = True,
               max_row_bytes: int = NO_LIMIT) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, record, text)` from a JSONL file, one line at a time.

    A line that is not valid JSON, or longer than `max_row_bytes` (not decoded then), yields a
    `RowError`; a last line cut in the middle (no newline, invalid JSON) raises `InputError`: the
    file was truncated. With `parse=False` the record is an `Unparsed` marker and
    `parse_jsonl_line` does that work later (in preprocess workers).
    """
    total = source.path.stat().st_size
    done = 0
    with open_bytes(source) as (fh, file):
        compressed = fh is not file
        for number, raw in enumerate(fh, start=1):
            done += len(raw)
            if progress is not None and number % 4096 == 0:
                progress(file.tell() if compressed else done, total)
            if len(raw) > max_row_bytes:
                yield number, _too_large(len(raw), max_row_bytes), None
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(source, raw, exc.start, number - 1) from None
            if not text.strip():
                continue
            last = not raw.endswith(b"\n")  # only the file's last line can lack its newline
            if not parse:
                yield number, Unparsed(last), text
                continue
            record = parse_jsonl_line(source.name, number, text, last)
            yield number, record, (None if isinstance(record, RowError) else text)
    if progress is not None:
        progress(total, total)


def read_json_array(source: Source, progress: Progress | None = None,
                    max_row_bytes: int = NO_LIMIT) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, element)` from a file holding one JSON array (line = where the element starts);
    an element over `max_row_bytes` characters comes back as a `RowError`.

    Raises:
        InputError: not UTF-8, truncated, or invalid JSON (one bad element breaks the whole array).
    """
    with open_bytes(source) as (fh, _):
        data = fh.read()
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
        yield where(pos), (element if end - pos <= max_row_bytes else _too_large(end - pos, max_row_bytes)), None
        del element
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


def read_csv(source: Source, columns: dict[str, str], progress: Progress | None = None,
             max_row_bytes: int = NO_LIMIT) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(line, record)` from a CSV/TSV file with a header row, columns renamed by `columns`.

    Empty cells count as absent; cells of JSON columns (messages, conversations, history, tools)
    holding JSON are decoded. A row whose cells hold more than `max_row_bytes` characters is a `RowError`.
    """
    total = source.path.stat().st_size
    kind = compression_of(source.path)
    delimiter = "\t" if (source.path.with_suffix("") if kind else source.path).suffix.lower() == ".tsv" else ","
    done = 0
    # csv's own cap (128 KiB per cell) would stop the whole file at one long answer: rows are
    # bounded by max_row_bytes instead (a row error, not the end of the file).
    csv.field_size_limit(2**31 - 1)

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

    with open_bytes(source) as (fh, file):
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
                size = sum(map(len, cells))
                if size > max_row_bytes:
                    yield start, _too_large(size, max_row_bytes), None
                    continue
                yield start, {name: _cell(name, cells[i]) for name, i in index.items()}, None
                if progress is not None and start % 4096 == 0:
                    progress(file.tell() if fh is not file else done, total)
        except csv.Error as exc:
            raise InputError(f"{source.name}:{reader.line_num}: invalid CSV: {exc}") from None
    if progress is not None:
        progress(total, total)


def read_parquet(source: Source, columns: dict[str, str], progress: Progress | None = None,
                 max_row_bytes: int = NO_LIMIT) -> Iterator[tuple[int, Any, str | None]]:
    """Yield `(row number, record)` from a Parquet file, a batch at a time, columns renamed; a row
    whose text cells hold more than `max_row_bytes` characters is a `RowError`."""
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
            size = sum(len(values[i]) for values in cols.values() if isinstance(values[i], (str, bytes)))
            if size > max_row_bytes:
                yield number, _too_large(size, max_row_bytes), None
                continue
            yield number, {name: _cell(name, values[i]) for name, values in cols.items()}, None
        if progress is not None:
            progress(number, total)
