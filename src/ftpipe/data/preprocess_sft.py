"""Stage `preprocess-sft`: read a dataset, validate and normalise it to chat messages, split, measure.

First stage of the pipeline; `finetune-sft` reads its output. Input: `data.source` in any
supported format (alpaca JSON/JSONL, OpenAI `messages`, ShareGPT, prompt/completion, text, CSV,
Parquet, a Label Studio export, or a Label Studio project over its API). Output:

    prepared/<data.name>/train.jsonl, val.jsonl     {"messages": [...]} per line (+ "tools")
    prepared/<data.name>/metadata.json              counts, token lengths, hashes, tokenizer
    logs/_prepared/<data.name>/manifest.json        (written by ftpipe.core.stage.execute)

Rows are streamed: read -> normalise -> dedupe -> render with the chat template and count tokens
(in batches) -> drop/truncate over `preprocess.max_length` -> a temporary file; then the kept rows
are sampled/limited and split by seed into train and val in a second pass. Memory holds one batch,
an 8-byte digest per row (dedupe), a 4-byte token length and a 1-byte split flag per kept row.

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from ftpipe.core.errors import ConfigError, InputError
from ftpipe.core.fsutil import atomic_write_json, sha256_file
from ftpipe.core.runs import Project
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.data import flat_exports, label_studio, readers
from ftpipe.data.formats import REQUIRED_KEYS, RowError, describe_keys, detect_row_format
from ftpipe.data.mapping import remap, resolve_dataset_info
from ftpipe.data.readers import Source, Unparsed, parse_jsonl_line, train_val_sources
from ftpipe.data.rowwork import LazyRenderer, Workers, batches, few_collections, prepare_batch, worker_count

log = logging.getLogger(__name__)

BATCH = 512  # rows per batch in-process
WORKER_BATCH = 2048  # rows per batch sent to a worker process
ERRORS_KEPT = 100  # bad-row messages kept in metadata.json (all are counted)
DETECT_PEEK = 100  # records looked at to detect the format
HIST_BINS = 20
NOT_ERRORS = ("no_annotation",)  # dropped, but not a malformed row: not shown, not --strict
PLACEHOLDER_LINES = 20  # row numbers kept per unfilled placeholder name


def prepare(ctx: StageContext) -> dict[str, Path]:
    """Resolve the inputs (exporting a Label Studio project first); prepared/<data.name>/ is project-wide.

    `ctx.options`: `progress=callable(done, total)` for a progress bar.

    Raises:
        ConfigError / InputError: bad config or input (exit 2).
    """
    from ftpipe.core.model_ref import resolve_model

    cfg = ctx.config
    project = ctx.project
    inputs: dict[str, Path] = {}
    data, info = resolve_dataset_info(cfg.data, project.root)
    if info is not None:
        inputs["dataset_info"] = info
    if cfg.data.format == "label_studio_api":
        dest = ctx.log_dir / f"label_studio_project_{cfg.data.label_studio.project_id}.json"
        ctx.options["label_studio"] = label_studio.export_project(cfg.data.label_studio, dest)
        inputs["source"] = dest
    else:
        if not data.source:
            raise ConfigError("data.source: not set", hint="ftpipe preprocess-sft --source PATH (or set data.source, "
                              "or data.dataset_info.file and .entry)")
        inputs["source"] = existing_file(project, data.source, "data.source")
    if cfg.data.val_source:
        inputs["val_source"] = existing_file(project, cfg.data.val_source, "data.val_source")
    ref = resolve_model(cfg.model, project.root)
    if ref.path:
        inputs["model"] = Path(ref.path)
    return inputs


def existing_file(project: Project, path: str, key: str, what: str = "dataset") -> Path:
    """`path` (config key `key`) resolved against the project root.

    Raises:
        InputError: no such file, naming the key.
    """
    resolved = project.resolve(path)
    if not resolved.is_file():
        raise InputError(f"{key} {path}: {what} file not found", hint=f"check {key} (relative to {project.root})")
    return resolved


def run(ctx: StageContext) -> StageResult:
    """Read, validate, normalise, dedupe, measure, split and write `prepared/<name>/`."""
    import numpy as np

    cfg = ctx.config
    pre = cfg.preprocess
    project = ctx.project
    data, info = resolve_dataset_info(cfg.data, project.root)
    if info is not None:
        log.info("%s: entry %r: %s, %s format%s", project.rel(info), data.dataset_info.entry, project.rel(project.resolve(data.source)),
                 data.format, f", columns {data.columns}" if data.columns else "")
    start = time.monotonic()

    renderer = LazyRenderer(cfg.model, project.root, pre.fast_render)
    out_dir = project.prepared_dir(data.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    if data.format == "label_studio_api":
        main = Source(ctx.log_dir / f"label_studio_project_{data.label_studio.project_id}.json", "")
        main.name = project.rel(main.path)
    else:
        main = Source.configured(project, data.source)
    sources = train_val_sources(project, main, data.val_source)

    stats = _Stats(strict=pre.strict, shown=pre.errors_shown)
    seen = Seen()
    kept: dict[str, tuple[Path, array]] = {}
    formats = {}
    n_workers = worker_count(pre.workers, main.path)
    workers = Workers(n_workers, cfg.model, project.root, pre.fast_render, data, pre) if n_workers else None
    if workers:
        log.info("parsing and token counting in %d worker processes", n_workers)
    try:
        for role, source in sources:
            fmt, records, data = open_input(source, data, ctx.options.get("progress") if role == "train" else None,
                                            pre.max_row_bytes)
            if workers and data is not workers.data:
                workers.close()  # the settings the format needs (the answer field of a flat export) changed
                workers = Workers(n_workers, cfg.model, project.root, pre.fast_render, data, pre)
            formats[role] = fmt
            tmp = out_dir / f".{role}.kept.tmp"
            lengths = array("I")
            with open(tmp, "w", encoding="utf-8") as sink, few_collections():
                _process(source, fmt, records, data, pre, renderer, stats, seen, sink, lengths, workers)
            kept[role] = (tmp, lengths)
            log.info("%s: %s format, %d rows read so far, %d kept", source.name, fmt, stats.read, len(lengths))
        tokenizer = (workers.record() if workers else renderer.record()) if len(kept["train"][1]) else None
    finally:
        if workers:
            workers.close()

    n_main = len(kept["train"][1])
    if n_main == 0:
        _cleanup(kept)
        raise InputError(f"{main.name}: {stats.empty_reason()}", hint=stats.empty_hint())
    if stats.errors:
        log.warning(
            "%d bad rows dropped (first %d shown above; all counted in metadata.json)",
            stats.errors, min(stats.errors, pre.errors_shown),
        )
    stats.report_placeholders()
    if stats.render.get("tools_as_text"):
        log.warning("%d rows with tools or tool calls written as text: the chat template does not render them "
                    "(preprocess.tools_fallback=text)", stats.render["tools_as_text"])

    train_out, val_out = out_dir / "train.jsonl", out_dir / "val.jsonl"
    selected = _select(n_main, pre)
    stats.dropped["over_limit"] += n_main - len(selected)
    writers = {"train": RowWriter(train_out), "val": RowWriter(val_out)}
    final_lengths = array("I")
    if data.val_source:
        for i, line in _pick(kept["train"][0], selected):
            writers["train"].write(line)
            final_lengths.append(kept["train"][1][i])
        val_tmp, val_lengths = kept["val"]
        with open(val_tmp, encoding="utf-8") as fh:
            for line in fh:
                writers["val"].write(line)
        final_lengths.extend(val_lengths)
    else:
        n_sel = len(selected)
        n_val = min(max(1, round(n_sel * pre.val_fraction)), n_sel - 1) if pre.val_fraction > 0 else 0
        is_val = np.zeros(n_sel, dtype=bool)  # one byte per row, not a set of indices
        is_val[np.random.default_rng(pre.seed).choice(n_sel, n_val, replace=False)] = True
        for j, (i, line) in enumerate(_pick(kept["train"][0], selected)):
            writers["val" if is_val[j] else "train"].write(line)
            final_lengths.append(kept["train"][1][i])
    outputs = {}
    for role, writer in writers.items():
        outputs[role] = writer.close()
    _cleanup(kept)

    seconds = time.monotonic() - start
    metadata = {
        "dataset": data.name,
        "source": _source_record(ctx, main, data),
        "dataset_info": {"file": data.dataset_info.file, "entry": data.dataset_info.entry} if data.dataset_info.entry else None,
        "format": formats["train"],
        "val_source": {"path": sources[1][1].name, "format": formats["val"], "sha256": sha256_file(sources[1][1].path)}
        if data.val_source else None,
        "counts": {
            "read": stats.read,
            "kept": outputs["train"]["rows"] + outputs["val"]["rows"],
            "train": outputs["train"]["rows"],
            "val": outputs["val"]["rows"],
            "truncated": stats.truncated,
            "chunked": stats.chunked,
            "chunks": stats.chunks,
            "dropped": dict(stats.dropped),
        },
        "placeholders": {name: {"rows": n, "first_lines": stats.placeholder_lines[name]}
                         for name, n in sorted(stats.placeholders.items())},
        "errors": {"count": stats.errors, "first": stats.messages},
        "tokens": token_stats(final_lengths, pre.max_length),
        "tokenizer": tokenizer,
        "render": {key: stats.render.get(key, 0) for key in ("fast", "jinja", "mismatches", "segmented", "tools_as_text")},
        "workers": n_workers,
        "settings": pre.model_dump(mode="json"),
        "outputs": {f"{role}.jsonl": rec for role, rec in outputs.items()},
        "rows_per_second": round(stats.read / seconds, 1) if seconds > 0 else None,
    }
    meta_path = out_dir / "metadata.json"
    atomic_write_json(meta_path, metadata)
    tokens = metadata["tokens"]
    dropped = sum(stats.dropped.values())
    metrics = {
        "rows_read": stats.read,
        "rows_kept": metadata["counts"]["kept"],
        "rows_train": outputs["train"]["rows"],
        "rows_val": outputs["val"]["rows"],
        **{f"dropped_{k}": v for k, v in sorted(stats.dropped.items())},
        "truncated": stats.truncated,
        **({"chunked": stats.chunked, "chunks": stats.chunks} if stats.chunked else {}),
        "tokens_p50": tokens["p50"],
        "tokens_p95": tokens["p95"],
        "tokens_max": tokens["max"],
        "rows_per_second": metadata["rows_per_second"],
    }
    summary = (
        f"{project.rel(out_dir)}/: {outputs['train']['rows']} train + {outputs['val']['rows']} val rows"
        f" ({dropped} dropped, {stats.truncated} truncated"
        + (f", {stats.chunked} chunked into {stats.chunks}" if stats.chunked else "") + ")"
    )
    return StageResult(outputs=[train_out, val_out, meta_path], metrics=metrics, summary=summary)


class Seen:
    """Exact-duplicate filter holding 8 bytes per row: a sorted int64 array plus a small set of
    recent digests merged into it every `MERGE` rows (a Python set would take ~70 bytes a row)."""

    MERGE = 1 << 16

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self.sorted = np.empty(0, dtype=np.int64)
        self.recent: set[int] = set()

    def add(self, key: int) -> bool:
        """Record `key`; False when it was seen before."""
        if key in self.recent:
            return False
        if self.sorted.size:
            i = int(self.sorted.searchsorted(key))
            if i < self.sorted.size and self.sorted[i] == key:
                return False
        self.recent.add(key)
        if len(self.recent) >= self.MERGE:
            merged = self.np.concatenate([self.sorted, self.np.fromiter(self.recent, self.np.int64, len(self.recent))])
            merged.sort()
            self.sorted, self.recent = merged, set()
        return True


class RowStats:
    """Counts per drop reason and the bad-row messages (first few logged, first 100 kept): what a
    preprocess stage reports about the rows it could not use (preprocess-sft, preprocess-dpo)."""

    UNIT = "rows"  # what a usable row is called in the "no usable ..." line

    def __init__(self, strict: bool, shown: int, reasons: tuple[str, ...]) -> None:
        self.strict, self.shown = strict, shown
        self.read = 0
        self.errors = 0
        self.dropped: Counter = Counter(dict.fromkeys(reasons, 0))
        self.render: Counter = Counter()  # the renderer's counters, summed over batches (and workers)
        self.messages: list[str] = []
        self.first: dict[str, str] = {}  # drop reason -> where its first row is (file:line field)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self.first.setdefault(reason, where)

    def bad(self, source: Source, line: int, err: RowError) -> None:
        """Count a bad row; log its line (the first `shown`), or raise it with --strict."""
        self.drop(err.reason, f"{source.name}:{line} {err.field}")
        if err.reason in NOT_ERRORS:
            return
        message = f"{source.name}:{line}: {err.field}: {self.wording(err.what)}"
        if self.strict:
            raise InputError(message, hint="fix the row, or run without --strict to drop bad rows")
        self.errors += 1
        if self.errors <= self.shown:
            log.warning("%s", message)
        if len(self.messages) < ERRORS_KEPT:
            self.messages.append(message)

    def wording(self, what: str) -> str:
        """A row error's text as this stage says it (the readers name preprocess-sft's keys)."""
        return what

    def empty_reason(self) -> str:
        """Why no row was usable: the counts per reason, each with where its first row is."""
        if self.read == 0:
            return "no rows in the file"
        parts = [f"{n} {reason.replace('_', ' ')}" + (f" (first: {self.first[reason]})" if reason in self.first else "")
                 for reason, n in self.dropped.items() if n]
        return f"no usable {self.UNIT} ({self.read} read; dropped: {', '.join(parts)})"

    def only(self, reason: str) -> bool:
        """Whether every dropped row was dropped for `reason`."""
        total = sum(self.dropped.values())
        return bool(total) and self.dropped.get(reason, 0) == total


class _Stats(RowStats):
    """preprocess-sft's counters: the common ones, truncated / chunked rows and unfilled placeholders."""

    def __init__(self, strict: bool, shown: int) -> None:
        super().__init__(strict, shown, ("invalid", "duplicate", "too_long", "over_limit"))
        self.truncated = 0
        self.chunked = 0  # text rows split into max_length windows
        self.chunks = 0  # the windows written
        self.placeholders: Counter = Counter()  # unfilled {{name}} -> rows
        self.placeholder_lines: dict[str, list[int]] = {}
        self.placeholder_source = ""

    def placeholder(self, source: Source, line: int, names: list[str]) -> None:
        self.placeholder_source = self.placeholder_source or source.name
        for name in names:
            self.placeholders[name] += 1
            lines = self.placeholder_lines.setdefault(name, [])
            if len(lines) < PLACEHOLDER_LINES and (not lines or lines[-1] != line):  # one-line JSON: all on line 1
                lines.append(line)

    def report_placeholders(self) -> None:
        """One warning line per unfilled placeholder name: how many rows, which lines, the key to fill it."""
        for name, n in sorted(self.placeholders.items()):
            lines = self.placeholder_lines[name]
            more = ", ..." if n > len(lines) else ""
            log.warning("%s: {{%s}} is left unfilled in %d rows (lines %s%s): it is trained literally "
                        "(fill it: --set data.placeholders.%s=VALUE)",
                        self.placeholder_source, name, n, ", ".join(map(str, lines)), more, name)

    def empty_hint(self) -> str:
        if self.only("too_long"):
            return "raise preprocess.max_length or set preprocess.overlength=truncate (text rows: chunk)"
        if self.only("too_large"):
            return "raise preprocess.max_row_bytes, or split the rows"
        if self.only("no_annotation"):
            return "annotate the tasks in Label Studio and export again"
        if self.errors:
            return "fix the rows named above, or check --format"
        return "check data.source"


def _parsed(source: Source, item: tuple[int, Any, str | None]) -> tuple[int, Any, str | None]:
    line, record, text = item
    if isinstance(record, Unparsed):
        record = parse_jsonl_line(source.name, line, text, record.last)
        return line, record, (None if isinstance(record, RowError) else text)
    return item


def open_input(source: Source, data, progress: Callable | None,
               max_row_bytes: int = readers.NO_LIMIT) -> tuple[str, Iterator[tuple[int, Any, str | None]], Any]:
    """(format, iterator of (line, record, JSON text), `data` with what the format needs filled in).

    The format is detected from the first valid record after `data.columns` renamed its keys; for a
    Label Studio JSON-MIN / CSV export the answer field is found here, once (`data.label_studio.answer_from_name`).

    Raises:
        InputError: unreadable file, or a format that cannot be detected / does not match.
        ConfigError: a flat Label Studio export whose answer field is ambiguous.
    """
    fmt = data.format
    container = readers.container_of(source)
    if fmt == "parquet" and container != "parquet":
        container = "parquet"
    elif fmt == "csv" and container != "csv":
        container = "csv"
    if container == "csv":
        records = readers.read_csv(source, data.columns, progress, max_row_bytes)
    elif container == "parquet":
        records = readers.read_parquet(source, data.columns, progress, max_row_bytes)
    elif container == "json":
        records = readers.read_json_array(source, progress, max_row_bytes)
    else:  # lines parsed in the batches (or workers)
        records = readers.read_jsonl(source, progress, parse=False, max_row_bytes=max_row_bytes)

    head = [_parsed(source, item) for item in itertools.islice(records, DETECT_PEEK)]
    records = itertools.chain(head, records)
    valid = [(line, r) for line, r, _ in head if not isinstance(r, RowError)]
    # Detection looks at renamed copies: the batches rename the records themselves.
    first = (valid[0][0], remap(dict(valid[0][1]), data.columns) if type(valid[0][1]) is dict else valid[0][1]) if valid else None

    def looks_like(record: Any) -> str | None:
        if container == "json" and label_studio.is_export(record):
            return "label_studio"
        if flat_exports.is_flat_export(record):
            return "label_studio_min"
        return detect_row_format(record)

    if fmt in ("auto", "csv", "parquet", "label_studio_api"):
        if fmt == "label_studio_api":
            return "label_studio", records, data
        if first is None:
            return ("text" if head else "unknown"), records, data  # only bad lines, or none: reported later
        line, record = first
        detected = looks_like(record)
        if detected is None:
            raise InputError(
                f"{source.name}:{line}: cannot detect the format: {describe_keys(record)} match none of "
                "messages, conversations (sharegpt), instruction+output (alpaca), prompt+completion, text, "
                "or a Label Studio export",
                hint="map your keys to these with data.columns, e.g. --set data.columns.instruction=question "
                "--set data.columns.output=answer (or pass --format)",
            )
        fmt = detected
    elif first is not None:
        line, record = first
        looks = looks_like(record)
        if looks is not None and looks != fmt:
            keys = REQUIRED_KEYS.get(looks, "data, annotations" if looks == "label_studio" else "annotation_id, lead_time")
            raise InputError(
                f"{source.name}:{line}: --format {fmt} does not match the file: rows look like {looks} ({keys})",
                hint=f"--format {looks} (or --format auto)",
            )
    if fmt == "label_studio_min" and not data.label_studio.answer_from_name:
        answer = flat_exports.answer_field([r for _, r in valid], data.label_studio, f"{source.name}:{first[0] if first else 1}")
        log.info("%s: Label Studio JSON-MIN/CSV export, answer field %r", source.name, answer)
        data = data.model_copy(update={"label_studio": data.label_studio.model_copy(update={"answer_from_name": answer})})
    return fmt, records, data


def _process(source, fmt, records, data, pre, renderer, stats: _Stats, seen: Seen, sink, lengths: array, workers: Workers | None = None) -> None:
    """Normalise, count tokens, dedupe and filter one source; kept rows go to `sink` as JSON lines.

    The per-row work runs in batches, in-process or in `workers`; the outcomes are committed here in
    input order, so the result does not depend on the number of workers.
    """
    if workers is None:
        results = (prepare_batch(source.name, batch, fmt, data, pre, renderer) for batch in batches(records, BATCH))
    else:
        results = workers.map(source.name, batches(records, WORKER_BATCH), fmt)
    for outcomes, counters in results:
        stats.render.update(counters)
        _commit(source, outcomes, pre, stats, seen, sink, lengths)


def _commit(source, outcomes, pre, stats: _Stats, seen: Seen, sink, lengths: array) -> None:
    out = []
    for outcome in outcomes:
        if outcome[0] == "fatal":
            raise InputError(outcome[1], hint=outcome[2])
        if outcome[0] == "placeholders":
            stats.placeholder(source, outcome[1], outcome[2])
            continue
        stats.read += 1
        if outcome[0] == "bad":
            stats.bad(source, outcome[1], outcome[2])
            continue
        _, line, encoded, n, kind, extra = outcome
        if pre.dedupe and not seen.add(hash(encoded)):
            stats.drop("duplicate", f"{source.name}:{line}")
        elif kind == "ok":
            out.append(encoded)
            lengths.append(n)
        elif kind == "truncated":
            stats.truncated += 1
            out.append(extra)
            lengths.append(n)
        elif kind == "chunked" and extra:
            stats.chunked += 1
            stats.chunks += len(extra)
            for chunk_line, chunk_n in extra:
                out.append(chunk_line)
                lengths.append(chunk_n)
        elif kind in ("too_long", "chunked"):
            stats.drop("too_long", f"{source.name}:{line}, {n} tokens > preprocess.max_length={pre.max_length}")
        else:
            stats.bad(source, line, RowError("messages", f"the chat template rejects this conversation: {extra}"))
    if out:
        sink.write("\n".join(out) + "\n")


def _select(n: int, pre) -> list[int]:
    """Indices of the kept rows to write: all, the first `limit`, or a seeded sample of `limit`."""
    if pre.limit is None or pre.limit >= n:
        return range(n)  # type: ignore[return-value]
    if pre.sample:
        import numpy as np

        return np.sort(np.random.default_rng(pre.seed + 1).choice(n, pre.limit, replace=False)).tolist()
    return range(pre.limit)  # type: ignore[return-value]


def _pick(path: Path, selected) -> Iterator[tuple[int, str]]:
    """(index, line) of the selected lines of a kept-rows file, in order (one pass)."""
    wanted = iter(selected)
    target = next(wanted, None)
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if target is None:
                return
            if i == target:
                yield i, line
                target = next(wanted, None)


class RowWriter:
    """Writes a JSONL output through a temp file, hashing as it goes; `close` renames it in place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.fh = open(self.tmp, "w", encoding="utf-8")
        self.sha = hashlib.sha256()
        self.rows = 0

    def write(self, line: str) -> None:
        self.fh.write(line)
        self.sha.update(line.encode("utf-8"))
        self.rows += 1

    def close(self) -> dict:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return {"rows": self.rows, "sha256": self.sha.hexdigest()}


def _cleanup(kept: dict) -> None:
    for tmp, _ in kept.values():
        tmp.unlink(missing_ok=True)


def _source_record(ctx: StageContext, main: Source, data) -> dict:
    record: dict[str, Any] = {"path": main.name, "sha256": sha256_file(main.path), "bytes": main.path.stat().st_size}
    if data.format == "label_studio_api":
        record["label_studio"] = ctx.options.get("label_studio")
    return record


def token_stats(lengths: array, max_length: int) -> dict[str, Any]:
    """Token-length summary: count, total, min/mean/max, percentiles and a histogram over [0, max_length]."""
    import numpy as np

    values = np.frombuffer(lengths, dtype=np.uint32) if len(lengths) else np.zeros(0, dtype=np.uint32)
    if values.size == 0:
        return {"rows": 0, "total": 0, "min": 0, "mean": 0.0, "max": 0, "p50": 0, "p90": 0, "p95": 0, "p99": 0,
                "histogram": {"edges": [], "counts": []}}
    edges = np.linspace(0, max_length, HIST_BINS + 1).round().astype(int)
    counts, _ = np.histogram(values, bins=edges)
    pct = {f"p{p}": int(np.percentile(values, p, method="nearest")) for p in (50, 90, 95, 99)}
    return {
        "rows": int(values.size),
        "total": int(values.sum(dtype=np.uint64)),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "max": int(values.max()),
        **pct,
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
