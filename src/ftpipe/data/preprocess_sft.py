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

The stage contract (ftpipe/core/stage.py): `check` validates the config and returns the inputs to
hash, without a connection or a write (a Label Studio project is a `Remote` input, its URL, so the
stage runs every time); `plan` resolves the dataset_info entry and exports the Label Studio project
into logs/_prepared/<data.name>/; `run` reads the sources -> checks what was kept -> selects, splits
and writes -> writes metadata.json. What preprocess-dpo shares with it is in ftpipe/data/prepared_io.py.

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import itertools
import logging
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftpipe.core.errors import ConfigError, InputError
from ftpipe.core.fsutil import atomic_write_json, sha256_file
from ftpipe.core.manifest import Remote
from ftpipe.core.runs import Project
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.data import flat_exports, label_studio, readers
from ftpipe.data.config import DataConfig
from ftpipe.data.formats import REQUIRED_KEYS, RowError, describe_keys, detect_row_format
from ftpipe.data.mapping import remap, resolve_dataset_info
from ftpipe.data.prepared_io import (
    KeptRows,
    RowStats,
    RowWriter,
    Seen,
    discard,
    existing_file,
    token_stats,
    val_flags,
)
from ftpipe.data.readers import Source, Unparsed, parse_jsonl_line, train_val_sources
from ftpipe.data.rowwork import (
    LazyRenderer,
    RowOutcome,
    Workers,
    batches,
    few_collections,
    prepare_batch,
    worker_count,
)
from ftpipe.handoff import chosen_template

log = logging.getLogger(__name__)

BATCH = 512  # rows per batch in-process
WORKER_BATCH = 2048  # rows per batch sent to a worker process
DETECT_PEEK = 100  # records looked at to detect the format
PLACEHOLDER_LINES = 20  # row numbers kept per unfilled placeholder name


@dataclass(frozen=True)
class PreprocessSftPlan:
    """What preprocess-sft reads, resolved before the work."""

    data: DataConfig  # the data section, with the settings of its dataset_info entry filled in
    dataset_info: Path | None  # the LLaMA-Factory dataset_info.json read (None: not used)
    source: Source  # the main input: data.source, or the Label Studio project's export in the log folder
    label_studio: dict[str, Any] | None = None  # the export's record (url, project_id, title, sha256)


def check(ctx: StageContext) -> dict[str, Path | Remote]:
    """The inputs to hash: the source file(s), the dataset_info.json, the model folder; a Label Studio
    project is `Remote` (its URL: not fetched here, so the stage runs every time). No connection, no
    writes; prepared/<data.name>/ is project-wide.

    Raises:
        ConfigError / InputError: bad config, a missing file, Label Studio settings missing (exit 2).
    """
    from ftpipe.core.model_ref import resolve_model

    cfg = ctx.config
    project = ctx.project
    inputs: dict[str, Path | Remote] = {}
    data, info = resolve_dataset_info(cfg.data, project.root)
    if info is not None:
        inputs["dataset_info"] = info
    if cfg.data.format == "label_studio_api":
        label_studio.api_token(cfg.data.label_studio)  # url, project_id and a token are set
        inputs["source"] = Remote(label_studio.project_url(cfg.data.label_studio))
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
    inputs.update(chosen_template.require(cfg.model, project.root, ref.path, "ftpipe preprocess-sft"))
    return inputs


def plan(ctx: StageContext) -> PreprocessSftPlan:
    """Resolve the dataset_info entry and the main input; export a Label Studio project (the
    `label_studio_api` format) to logs/_prepared/<data.name>/label_studio_project_<id>.json.

    Raises:
        ConfigError / InputError: bad dataset_info entry; Label Studio unreachable, token rejected,
            project not found (exit 2).
    """
    project = ctx.project
    data, info = resolve_dataset_info(ctx.config.data, project.root)
    record = None
    if data.format == "label_studio_api":
        path = ctx.log_dir / f"label_studio_project_{data.label_studio.project_id}.json"
        record = label_studio.export_project(data.label_studio, path)
        source = Source(path, project.rel(path))
    else:
        source = Source.configured(project, data.source)
    return PreprocessSftPlan(data=data, dataset_info=info, source=source, label_studio=record)


def run(ctx: StageContext, plan: PreprocessSftPlan) -> StageResult:
    """Read, validate, normalise, dedupe, measure, split and write `prepared/<name>/`.

    read the sources -> check what was kept -> select, split and write -> metadata.json.
    """
    pre = ctx.config.preprocess
    project = ctx.project
    data = plan.data
    if plan.dataset_info is not None:
        log.info("%s: entry %r: %s, %s format%s", project.rel(plan.dataset_info), data.dataset_info.entry,
                 project.rel(project.resolve(data.source)), data.format,
                 f", columns {data.columns}" if data.columns else "")
    start = time.monotonic()
    out_dir = project.prepared_dir(data.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    read = _read_sources(ctx, plan, out_dir)
    _check_kept(read, plan.source, pre)
    outputs, lengths = _split_and_write(read, pre, out_dir)
    metadata = _metadata(plan, pre, read, outputs, lengths, time.monotonic() - start)
    meta_path = out_dir / "metadata.json"
    atomic_write_json(meta_path, metadata)
    return _result(project, out_dir, metadata, read.stats, [out_dir / "train.jsonl", out_dir / "val.jsonl", meta_path])


@dataclass
class _Read:
    """What reading the sources gave: the kept rows and format of each role (train, val), the
    counters, the tokenizer's record, the worker processes used."""

    kept: dict[str, KeptRows]
    formats: dict[str, str]
    stats: _Stats
    tokenizer: dict[str, Any] | None
    workers: int
    val_source: Source | None


def _read_sources(ctx: StageContext, plan: PreprocessSftPlan, out_dir: Path) -> _Read:
    """Stream each source through `_process` (in-process or in worker processes) into a temporary
    file of kept rows in `out_dir`."""
    cfg = ctx.config
    pre = cfg.preprocess
    project = ctx.project
    data = plan.data
    renderer = LazyRenderer(cfg.model, project.root, pre.fast_render)
    sources = train_val_sources(project, plan.source, data.val_source)
    stats = _Stats(strict=pre.strict, shown=pre.errors_shown)
    seen = Seen()
    kept: dict[str, KeptRows] = {}
    formats: dict[str, str] = {}
    n_workers = worker_count(pre.workers, plan.source.path)
    workers = Workers(n_workers, cfg.model, project.root, pre.fast_render, data, pre) if n_workers else None
    if workers:
        log.info("parsing and token counting in %d worker processes", n_workers)
    try:
        for role, source in sources:
            fmt, records, data = open_input(source, data, ctx.progress if role == "train" else None, pre.max_row_bytes)
            if workers and data is not workers.data:
                workers.close()  # the settings the format needs (the answer field of a flat export) changed
                workers = Workers(n_workers, cfg.model, project.root, pre.fast_render, data, pre)
            formats[role] = fmt
            tmp = out_dir / f".{role}.kept.tmp"
            lengths = array("I")
            with open(tmp, "w", encoding="utf-8") as sink, few_collections():
                _process(source, fmt, records, data, pre, renderer, stats, seen, sink, lengths, workers)
            kept[role] = KeptRows(tmp, lengths)
            log.info("%s: %s format, %d rows read so far, %d kept", source.name, fmt, stats.read, len(lengths))
        tokenizer = (workers.record() if workers else renderer.record()) if len(kept["train"].lengths) else None
    finally:
        if workers:
            workers.close()
    val_source = sources[1][1] if len(sources) > 1 else None
    return _Read(kept, formats, stats, tokenizer, n_workers, val_source)


def _check_kept(read: _Read, main: Source, pre) -> None:
    """Refuse a source with no usable row; warn about bad rows, unfilled placeholders, tools as text.

    Raises:
        InputError: no row kept, with the counts per drop reason and a hint.
    """
    stats = read.stats
    if not read.kept["train"].lengths:
        discard(read.kept)
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


def _split_and_write(read: _Read, pre, out_dir: Path) -> tuple[dict[str, dict], array]:
    """Select the kept rows (`preprocess.limit` / `sample`), split them by seed into train and val (or
    take the val source's as val), write train.jsonl and val.jsonl, delete the temporary files.

    Returns:
        ({"train" / "val": {rows, sha256}}, the token lengths of the rows written, train then val).
    """
    kept = read.kept
    train = kept["train"]
    n_main = len(train.lengths)
    selected = _select(n_main, pre)
    read.stats.dropped["over_limit"] += n_main - len(selected)
    writers = {"train": RowWriter(out_dir / "train.jsonl"), "val": RowWriter(out_dir / "val.jsonl")}
    lengths = array("I")
    if "val" in kept:  # a separate validation file
        for i, line in _pick(train.path, selected):
            writers["train"].write(line)
            lengths.append(train.lengths[i])
        with open(kept["val"].path, encoding="utf-8") as fh:
            for line in fh:
                writers["val"].write(line)
        lengths.extend(kept["val"].lengths)
    else:
        is_val = val_flags(len(selected), pre.val_fraction, pre.seed)
        for j, (i, line) in enumerate(_pick(train.path, selected)):
            writers["val" if is_val[j] else "train"].write(line)
            lengths.append(train.lengths[i])
    outputs = {role: writer.close() for role, writer in writers.items()}
    discard(kept)
    return outputs, lengths


def _metadata(plan: PreprocessSftPlan, pre, read: _Read, outputs: dict[str, dict], lengths: array,
              seconds: float) -> dict[str, Any]:
    """What metadata.json says: source, format, counts, drops, errors, tokens, tokenizer, settings."""
    data, main, stats = plan.data, plan.source, read.stats
    source: dict[str, Any] = {"path": main.name, "sha256": sha256_file(main.path), "bytes": main.path.stat().st_size}
    if data.format == "label_studio_api":
        source["label_studio"] = plan.label_studio
    val = read.val_source
    return {
        "dataset": data.name,
        "source": source,
        "dataset_info": {"file": data.dataset_info.file, "entry": data.dataset_info.entry} if data.dataset_info.entry else None,
        "format": read.formats["train"],
        "val_source": {"path": val.name, "format": read.formats["val"], "sha256": sha256_file(val.path)} if val else None,
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
        "tokens": token_stats(lengths, pre.max_length),
        "tokenizer": read.tokenizer,
        "render": {key: stats.render.get(key, 0) for key in ("fast", "jinja", "mismatches", "segmented", "tools_as_text")},
        "workers": read.workers,
        "settings": pre.model_dump(mode="json"),
        "outputs": {f"{role}.jsonl": rec for role, rec in outputs.items()},
        "rows_per_second": round(stats.read / seconds, 1) if seconds > 0 else None,
    }


def _result(project: Project, out_dir: Path, metadata: dict[str, Any], stats: _Stats, outputs: list[Path]) -> StageResult:
    """The manifest's metrics and the one-line summary."""
    counts, tokens = metadata["counts"], metadata["tokens"]
    dropped = sum(stats.dropped.values())
    metrics = {
        "rows_read": stats.read,
        "rows_kept": counts["kept"],
        "rows_train": counts["train"],
        "rows_val": counts["val"],
        **{f"dropped_{k}": v for k, v in sorted(stats.dropped.items())},
        "truncated": stats.truncated,
        **({"chunked": stats.chunked, "chunks": stats.chunks} if stats.chunked else {}),
        "tokens_p50": tokens["p50"],
        "tokens_p95": tokens["p95"],
        "tokens_max": tokens["max"],
        "rows_per_second": metadata["rows_per_second"],
        **({"chat_template": metadata["tokenizer"]["chat_template"]}
           if (metadata.get("tokenizer") or {}).get("chat_template") else {}),
    }
    summary = (
        f"{project.rel(out_dir)}/: {counts['train']} train + {counts['val']} val rows"
        f" ({dropped} dropped, {stats.truncated} truncated"
        + (f", {stats.chunked} chunked into {stats.chunks}" if stats.chunked else "") + ")"
    )
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)


class _Stats(RowStats):
    """preprocess-sft's counters: the common ones, truncated / chunked rows and unfilled placeholders."""

    logger = log  # bad rows are logged as this stage's

    def __init__(self, strict: bool, shown: int) -> None:
        super().__init__(strict, shown, ("invalid", "duplicate", "too_long", "over_limit"))
        self.truncated = 0
        self.chunked = 0  # text rows split into max_length windows
        self.chunks = 0  # the windows written
        self.placeholders: Counter = Counter()  # unfilled {{name}} -> rows
        self.placeholder_lines: dict[str, list[int]] = {}
        self.placeholder_source = ""

    def placeholder(self, source: Source, line: int, names: tuple[str, ...]) -> None:
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


def _commit(source, outcomes: list[RowOutcome], pre, stats: _Stats, seen: Seen, sink, lengths: array) -> None:
    """Count, dedupe and keep the outcomes of one batch, in input order; kept rows go to `sink`.

    Raises:
        InputError: a `fatal` outcome (the file or the tokenizer cannot be used); a bad row with --strict.
    """
    out = []
    for outcome in outcomes:
        kind, line = outcome.kind, outcome.line
        if kind == "fatal":
            raise InputError(outcome.message, hint=outcome.hint)
        if kind == "placeholders":
            stats.placeholder(source, line, outcome.names)
            continue
        stats.read += 1
        if kind == "bad":
            stats.bad(source, line, outcome.error)
            continue
        if pre.dedupe and not seen.add(hash(outcome.encoded)):
            stats.drop("duplicate", f"{source.name}:{line}")
        elif kind == "ok":
            out.append(outcome.encoded)
            lengths.append(outcome.tokens)
        elif kind == "truncated":
            stats.truncated += 1
            out.append(outcome.shortened)
            lengths.append(outcome.tokens)
        elif kind == "chunked" and outcome.chunks:
            stats.chunked += 1
            stats.chunks += len(outcome.chunks)
            for chunk_line, chunk_n in outcome.chunks:
                out.append(chunk_line)
                lengths.append(chunk_n)
        elif kind in ("too_long", "chunked"):
            stats.drop("too_long", f"{source.name}:{line}, {outcome.tokens} tokens > preprocess.max_length={pre.max_length}")
        else:  # rejected
            stats.bad(source, line, RowError("messages", f"the chat template rejects this conversation: {outcome.message}"))
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
