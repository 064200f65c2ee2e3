"""Stage `preprocess-dpo`: read preference data, validate and normalise it to pairs, split, measure.

Runs on its own (not a default stage of `ftpipe run`); `finetune-dpo` reads its output through
`ftpipe.handoff.pairs`. Input: `preference.source` (and optionally `preference.val_source`) as
JSON, JSONL, CSV or Parquet, plain or `.gz` / `.bz2` / `.zst`, in one of the formats of
`ftpipe/data/preference_formats.py` (TRL, LLaMA-Factory sharegpt / alpaca preference rows, a Label
Studio Pairwise export). Output:

    prepared/<preference.name>/train.jsonl, val.jsonl   {"prompt": [...], "chosen": [...], "rejected": [...]}
    prepared/<preference.name>/metadata.json            counts, drop reasons, token lengths, tokenizer
    logs/_prepared/<preference.name>/manifest.json      (written by ftpipe.core.stage.execute)

Rows are streamed: read -> normalise -> dedupe -> render prompt+chosen and prompt+rejected with the
chat template and count tokens (in batches) -> drop pairs over `preference.max_length` -> a temporary
file; the kept pairs are then split by seed into train and val. A bad row is one line
`file:line: field: what`, the first `preference.errors_shown` printed, all counted in metadata.json.

The stage contract (ftpipe/core/stage.py): `check` validates the settings and that the input files
exist and returns them; `plan` names the input files; `run` reads the sources -> splits and writes ->
writes metadata.json. The dedupe filter, the row counters, the hashing writer and the token summary
are shared with preprocess-sft through ftpipe/data/prepared_io.py.

    ftpipe preprocess-dpo --config config.yaml --source data/prefs.jsonl
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from ftpipe.core.errors import ConfigError, InputError
from ftpipe.core.fsutil import atomic_write_json, sha256_file
from ftpipe.core.manifest import Remote
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.data import preference_formats, readers
from ftpipe.data.formats import RowError, describe_keys, detect_row_format
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
from ftpipe.data.readers import Source, train_val_sources
from ftpipe.data.rowwork import LazyRenderer, batches, encode_row
from ftpipe.handoff import chosen_template
from ftpipe.handoff.pairs import pairs_dir

log = logging.getLogger(__name__)

BATCH = 256  # pairs rendered and counted together
DETECT_PEEK = 100  # records looked at to find the first valid one
COMMAND = "ftpipe preprocess-dpo"
_SURROGATE = re.compile("[\ud800-\udfff]")
SHAPES = ("prompt+chosen+rejected (trl), chosen+rejected (trl, implicit prompt), conversations+chosen+rejected "
          "(sharegpt), instruction+chosen+rejected (alpaca), or a Label Studio export")


@dataclass(frozen=True)
class PreprocessDpoPlan:
    """What preprocess-dpo reads, resolved before the work."""

    source: Source  # preference.source
    val_source: Source | None  # preference.val_source (None: val is split off the source)


def check(ctx: StageContext) -> dict[str, Path | Remote]:
    """Check the settings and that the input files exist; the inputs to hash (the files, the model
    folder). prepared/<preference.name>/ is project-wide.

    Raises:
        ConfigError / InputError: bad config or a missing file (exit 2).
    """
    from ftpipe.core.model_ref import resolve_model

    cfg = ctx.config
    pref = cfg.preference
    project = ctx.project
    if pref.name == cfg.data.name:
        raise ConfigError(f"preference.name {pref.name!r} is also data.name: the pairs would overwrite the SFT "
                          f"data in prepared/{pref.name}/", hint=f"--set preference.name={pref.name}-pairs")
    if not pref.source:
        raise ConfigError("preference.source: not set", hint=f"{COMMAND} --source PATH (or set preference.source)")
    inputs: dict[str, Path | Remote] = {
        "source": existing_file(project, pref.source, "preference.source", "preference")}
    if pref.val_source:
        inputs["val_source"] = existing_file(project, pref.val_source, "preference.val_source", "preference")
    ref = resolve_model(cfg.model, project.root)
    if ref.path:
        inputs["model"] = Path(ref.path)
    inputs.update(chosen_template.require(cfg.model, project.root, ref.path, COMMAND))
    return inputs


def plan(ctx: StageContext) -> PreprocessDpoPlan:
    """The input files, named as the project shows them."""
    project = ctx.project
    pref = ctx.config.preference
    sources = dict(train_val_sources(project, Source.configured(project, pref.source), pref.val_source))
    return PreprocessDpoPlan(source=sources["train"], val_source=sources.get("val"))


def run(ctx: StageContext, plan: PreprocessDpoPlan) -> StageResult:
    """Read, validate, normalise, dedupe, measure, split and write `prepared/<preference.name>/`.

    read the sources -> split and write -> metadata.json.
    """
    pref = ctx.config.preference
    project = ctx.project
    start = time.monotonic()
    renderer = LazyRenderer(ctx.config.model, project.root, fast=True)
    out_dir = pairs_dir(project, pref.name)
    out_dir.mkdir(parents=True, exist_ok=True)

    stats = _Stats(pref.strict, pref.errors_shown)
    kept, formats = _read_sources(ctx, plan, renderer, stats, out_dir)
    if not kept["train"].lengths:
        discard(kept)
        raise InputError(f"{plan.source.name}: {stats.empty_reason()}", hint=stats.empty_hint(plan.source.name))
    if stats.errors:
        log.warning("%d bad rows dropped (first %d shown above; all counted in metadata.json)",
                    stats.errors, min(stats.errors, pref.errors_shown))
    outputs, lengths = _split_and_write(kept, pref, out_dir)
    tokenizer = renderer.record()
    discard(kept)

    seconds = time.monotonic() - start
    val_source = plan.val_source
    metadata = {
        "dataset": pref.name,
        "kind": "preference",
        "source": {"path": plan.source.name, "sha256": sha256_file(plan.source.path),
                   "bytes": plan.source.path.stat().st_size},
        "format": formats["train"],
        "val_source": {"path": val_source.name, "format": formats["val"], "sha256": sha256_file(val_source.path)}
        if val_source else None,
        "counts": {
            "read": stats.read,
            "kept": outputs["train"]["rows"] + outputs["val"]["rows"],
            "train": outputs["train"]["rows"],
            "val": outputs["val"]["rows"],
            "dropped": dict(stats.dropped),
        },
        "errors": {"count": stats.errors, "first": stats.messages},
        # Tokens of a pair: the prompt plus the longer of its two answers, as rendered by the chat template.
        "tokens": token_stats(lengths, pref.max_length),
        "tokenizer": tokenizer,
        "render": {key: stats.render.get(key, 0) for key in ("fast", "jinja", "mismatches", "segmented")},
        "settings": pref.model_dump(mode="json"),
        "outputs": {f"{role}.jsonl": rec for role, rec in outputs.items()},
        "rows_per_second": round(stats.read / seconds, 1) if seconds > 0 else None,
    }
    meta_path = out_dir / "metadata.json"
    atomic_write_json(meta_path, metadata)
    dropped = sum(stats.dropped.values())
    metrics = {
        "rows_read": stats.read,
        "pairs_kept": metadata["counts"]["kept"],
        "pairs_train": outputs["train"]["rows"],
        "pairs_val": outputs["val"]["rows"],
        **{f"dropped_{k}": v for k, v in sorted(stats.dropped.items())},
        "tokens_p50": metadata["tokens"]["p50"],
        "tokens_max": metadata["tokens"]["max"],
    }
    summary = (f"{project.rel(out_dir)}/: {outputs['train']['rows']} train + {outputs['val']['rows']} val pairs "
               f"({dropped} dropped)")
    return StageResult(outputs=[out_dir / "train.jsonl", out_dir / "val.jsonl", meta_path], metrics=metrics,
                       summary=summary)


def _read_sources(ctx: StageContext, plan: PreprocessDpoPlan, renderer: LazyRenderer, stats: _Stats,
                  out_dir: Path) -> tuple[dict[str, KeptRows], dict[str, str]]:
    """Stream each source through `_process` into a temporary file of kept pairs in `out_dir`.

    Returns:
        (the kept pairs of each role, train and val; the format of each role). On any error the
        temporary files are deleted.
    """
    pref = ctx.config.preference
    seen = Seen()
    kept: dict[str, KeptRows] = {}
    formats: dict[str, str] = {}
    sources = [("train", plan.source)] + ([("val", plan.val_source)] if plan.val_source else [])
    try:
        for role, source in sources:
            fmt, container, records = open_pairs(source, pref.format, ctx.progress if role == "train" else None,
                                                 pref.max_row_bytes)
            formats[role] = fmt
            kept[role] = KeptRows(out_dir / f".{role}.kept.tmp", array("I"))
            with open(kept[role].path, "w", encoding="utf-8") as sink:
                _process(source, fmt, container, records, pref, renderer, stats, seen, sink, kept[role].lengths)
            log.info("%s: %s format, %d rows read so far, %d pairs kept", source.name, fmt, stats.read,
                     len(kept[role].lengths))
    except BaseException:
        discard(kept)
        raise
    return kept, formats


def _split_and_write(kept: dict[str, KeptRows], pref, out_dir: Path) -> tuple[dict[str, dict], array]:
    """Split the kept pairs by seed into train and val (or take the val source's as val) and write
    train.jsonl and val.jsonl.

    Returns:
        ({"train" / "val": {rows, sha256}}, the token lengths of the pairs written, train then val).
    """
    writers = {"train": RowWriter(out_dir / "train.jsonl"), "val": RowWriter(out_dir / "val.jsonl")}
    lengths = array("I")
    train = kept["train"]
    if "val" in kept:  # a separate validation file
        with open(train.path, encoding="utf-8") as fh:
            for line in fh:
                writers["train"].write(line)
        with open(kept["val"].path, encoding="utf-8") as fh:
            for line in fh:
                writers["val"].write(line)
        lengths.extend(train.lengths)
        lengths.extend(kept["val"].lengths)
    else:
        is_val = val_flags(len(train.lengths), pref.val_fraction, pref.seed)
        with open(train.path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                writers["val" if is_val[i] else "train"].write(line)
        lengths.extend(train.lengths)
    return {role: writer.close() for role, writer in writers.items()}, lengths


def open_pairs(source: Source, fmt: str, progress: Callable | None,
               max_row_bytes: int) -> tuple[str, str, Iterator[tuple[int, Any, str | None]]]:
    """(format, container, iterator of (line, record, text)) of one preference file.

    The format is detected from the first valid record (`fmt` auto), or checked against it.

    Raises:
        InputError: unreadable file; SFT data; a format that cannot be detected or does not match.
    """
    container = readers.container_of(source)
    if container == "csv":
        records = readers.read_csv(source, {}, progress, max_row_bytes)
    elif container == "parquet":
        records = readers.read_parquet(source, {}, progress, max_row_bytes)
    elif container == "json":
        records = readers.read_json_array(source, progress, max_row_bytes)
    else:
        records = readers.read_jsonl(source, progress, max_row_bytes=max_row_bytes)
    head = list(itertools.islice(records, DETECT_PEEK))
    records = itertools.chain(head, records)
    valid = [(line, r) for line, r, _ in head if not isinstance(r, RowError)]
    if not valid:  # no rows, or only bad ones: reported row by row
        return ("trl" if fmt == "auto" else fmt), container, records
    # The first record whose shape is known decides (a broken first row stays that row's error).
    line, record, detected = next(((line, r, f) for line, r in valid
                                   if (f := preference_formats.detect(r, container)) is not None),
                                  (*valid[0], None))
    if detected is None:
        sft = detect_row_format(record)
        if sft is not None:
            raise InputError(f"{source.name}:{line}: rows look like SFT data ({sft}: {describe_keys(record)}), not "
                             f"preference pairs: no chosen and rejected",
                             hint=f"ftpipe preprocess-sft --source {source.name} for SFT data; preference rows are "
                             f"{SHAPES}")
        if fmt == "auto":
            raise InputError(f"{source.name}:{line}: cannot detect the preference format: {describe_keys(record)} "
                             f"match none of {SHAPES}", hint="rename the keys (docs/dpo.md), or pass --format")
    elif fmt != "auto" and detected != fmt:
        raise InputError(f"{source.name}:{line}: --format {fmt} does not match the file: rows look like {detected}",
                         hint=f"--format {detected} (or --format auto)")
    return (detected if fmt == "auto" else fmt), container, records


class _Stats(RowStats):
    """preprocess-dpo's counters (RowStats), with its own drop reasons, key names and hints."""

    UNIT = "preference pairs"
    logger = log  # bad rows are logged as this stage's

    def __init__(self, strict: bool, shown: int) -> None:
        super().__init__(strict, shown, ("invalid", "identical", "duplicate", "too_long"))

    def wording(self, what: str) -> str:
        return what.replace("preprocess.max_row_bytes", "preference.max_row_bytes")  # the readers' wording

    def empty_hint(self, source: str) -> str:
        if self.only("too_long"):
            return f"raise the budget: {COMMAND} --set preference.max_length=4096"
        if self.only("too_large"):
            return f"raise preference.max_row_bytes, or split the rows: {COMMAND} --set preference.max_row_bytes=8388608"
        if self.only("no_annotation"):
            return f"annotate the tasks in Label Studio, export the project again, then: {COMMAND} --source EXPORT.json"
        if self.errors:
            return f"fix the rows named above (or pass --format), then: {COMMAND} --source {source}"
        return f"check preference.source, then: {COMMAND} --source PATH"


class _Pending(NamedTuple):
    """A valid, new pair of a batch, waiting for its token counts."""

    line: int
    pair: dict
    encoded: str  # its JSON line (the dedupe key, and what is written)


def _process(source: Source, fmt: str, container: str, records, pref, renderer: LazyRenderer, stats: _Stats,
             seen: Seen, sink, lengths: array) -> None:
    """Normalise, dedupe, count tokens and filter one source; kept pairs go to `sink` as JSON lines."""
    normalise = preference_formats.normaliser(fmt, pref.label_studio)
    cells = container in ("csv", "parquet")
    for batch in batches(records, BATCH):
        pending: list[_Pending] = []
        for line, record, _ in batch:
            stats.read += 1
            if isinstance(record, RowError):
                stats.bad(source, line, record)
                continue
            try:
                pair = normalise(preference_formats.json_cells(record) if cells else record)
                encoded = encode_row(pair)
            except RowError as err:
                stats.bad(source, line, err)
                continue
            bad = _SURROGATE.search(encoded)
            if bad:  # JSON "\ud800" without its pair: not text (the tokenizer and UTF-8 output refuse it)
                stats.bad(source, line, RowError("<row>", f"not valid Unicode: a lone surrogate \\u{ord(bad.group()):04x}"))
                continue
            if pref.dedupe and not seen.add(hash(encoded)):
                stats.drop("duplicate", f"{source.name}:{line}")
                continue
            pending.append(_Pending(line, pair, encoded))
        if not pending:
            continue
        r = renderer.get()
        before = dict(r.stats)
        counts = r.measure([{"messages": p.pair["prompt"] + p.pair[key]}
                            for p in pending for key in ("chosen", "rejected")])
        stats.render.update({k: v - before.get(k, 0) for k, v in r.stats.items()})
        out = []
        for i, p in enumerate(pending):
            chosen, rejected = counts[2 * i], counts[2 * i + 1]
            failed = next((key for key, n in (("chosen", chosen), ("rejected", rejected)) if isinstance(n, Exception)),
                          None)
            if failed is not None:
                error = chosen if failed == "chosen" else rejected
                reason = " ".join(str(error).split())[:200] or type(error).__name__
                stats.bad(source, p.line, RowError(failed, f"the chat template rejects prompt + {failed}: {reason}"))
                continue
            n = max(chosen, rejected)
            if n > pref.max_length:
                stats.drop("too_long", f"{source.name}:{p.line}, {n} tokens > preference.max_length={pref.max_length}")
                continue
            out.append(p.encoded)
            lengths.append(n)
        if out:
            sink.write("\n".join(out) + "\n")
