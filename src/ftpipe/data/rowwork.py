"""The per-row work of `preprocess-sft`, in batches: parse, normalise, validate, render, count tokens.

`prepare_batch` depends on nothing but its batch and the settings (no dedupe, no output, no counters), so
it runs either in-process or in worker processes (`Workers`); the main process then commits the
outcomes (one `RowOutcome` per record) in input order (ftpipe/data/preprocess_sft.py: dedupe,
drop/keep, write). The output is therefore the same, byte for byte, whatever the number of workers.

Workers are forked from a `forkserver` (never from the main process, which may hold threads and
locks) that imported transformers once; they ignore Ctrl-C (the main process stops them), and each
loads the tokenizer once, at its first batch.

    ftpipe preprocess-sft --config debug_config.yaml --set preprocess.workers=2
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from orjson import loads as _orjson_loads

from ftpipe.core.errors import FtpipeError, StageError
from ftpipe.data import flat_exports, label_studio
from ftpipe.data.formats import NORMALISERS, ROW_FORMATS, RowError, is_plain_messages, normalise_sharegpt
from ftpipe.data.mapping import field_in_file, remap
from ftpipe.data.readers import Unparsed, parse_jsonl_line
from ftpipe.data.render import Renderer, load_tokenizer, tokenizer_record, tools_as_text

log = logging.getLogger(__name__)

AUTO_MIN_BYTES = 16 * 2**20  # `preprocess.workers: null` starts workers for files at least this big
AUTO_MAX_WORKERS = 4
AUTO_MIN_CPUS = 3  # one core for the main process, at least two for workers
GC_YOUNG = 50_000  # allocations between young-generation GC passes while rows stream (CPython: 700)
PRELOAD = ("ftpipe.data.rowwork", "torch", "transformers", "transformers.models.auto.tokenization_auto",
           "transformers.tokenization_utils_tokenizers")
PRELOAD_CACHED = ("ftpipe.data.rowwork", "transformers", "tokenizers", "jinja2")  # the tokenizer is in the cache
# A lone UTF-16 surrogate (JSON "\ud800" without its pair) is not text: the tokenizer and the UTF-8
# output file both reject it, so such a row is a bad row. The escaped form is looked for in raw
# JSONL lines (the fast path), the decoded form in every normalised row.
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# LLaMA-Factory's identity.json style: {{name}}, {{ author }}.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
encode_row = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps(..., ensure_ascii=False) builds one per call



class RowOutcome(NamedTuple):
    """What `prepare_batch` made of one record; preprocess-sft commits them in input order.

    A NamedTuple (not a dataclass): millions are made and pickled back from the worker processes.
    `kind` says which fields are set:

        bad           a malformed row: `error`
        fatal         the file or the tokenizer cannot be used, stop here: `message`, `hint`
        placeholders  the next row holds {{name}} placeholders left unfilled: `names`
        ok            a valid row: `encoded` (its JSON line, the dedupe key), `tokens`
        truncated     a valid row cut to whole turns that fit: `encoded`, `tokens` (of the cut row),
                      `shortened` (the cut row's JSON line)
        chunked       a text row over the budget: `encoded`, `tokens`, `chunks` ([(JSON line, tokens)]
                      of its max_length windows; empty when none fits)
        too_long      a valid row over the budget: `encoded`, `tokens`
        rejected      the chat template refused the row: `encoded`, `message` (why)
    """

    kind: str
    line: int = 0
    encoded: str = ""
    tokens: int = 0
    error: RowError | None = None
    names: tuple[str, ...] = ()
    shortened: str = ""
    chunks: tuple[tuple[str, int], ...] = ()
    message: str = ""
    hint: str | None = None


_PENDING = RowOutcome("pending")  # a row's place in the batch while it waits for its token count


class LazyRenderer:
    """Loads the tokenizer at the first row that needs it: bad files fail fast, without importing
    transformers."""

    def __init__(self, model_cfg, root: Path, fast: bool) -> None:
        self.model_cfg, self.root, self.fast = model_cfg, root, fast
        self.renderer: Renderer | None = None
        self.ref = None

    def get(self) -> Renderer:
        if self.renderer is None:
            tokenizer, self.ref = load_tokenizer(self.model_cfg, self.root)
            self.renderer = Renderer(tokenizer, fast=self.fast)
            # The tokenizer and the modules it imported outlive the row loop: keep their objects
            # out of its collections (`few_collections` unfreezes them at the end).
            gc.freeze()
        return self.renderer

    def record(self) -> dict[str, Any]:
        """What metadata.json says about the tokenizer."""
        return tokenizer_record(self.get().tokenizer, self.ref, self.root, self.model_cfg)


@contextmanager
def few_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often while rows stream.

    The row work allocates millions of short-lived, acyclic containers (parsed JSON, outcome tuples,
    token encodings) that reference counting frees anyway; at CPython's default threshold the
    collector scans them every 700 allocations, and its older generations walk every object of the
    loaded libraries: 10-15% of the stage (docs/preprocess.md). Cycles (a bad row's exception and its
    traceback) are still collected, only less often.
    """
    old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()  # what `LazyRenderer.get` froze is collectable again after the stage


def normaliser(fmt: str, data) -> Callable[[Any], dict]:
    """The function turning one record of format `fmt` into `{"messages": [...], ...}`."""
    if fmt == "label_studio":
        return lambda record: label_studio.normalise_task(record, data.label_studio)
    if fmt == "label_studio_min":
        answer = data.label_studio.answer_from_name or "response"
        return lambda record: flat_exports.normalise_flat(record, data.label_studio, answer)
    if fmt == "sharegpt" and data.tags is not None:
        return lambda record: normalise_sharegpt(record, data.tags)
    if fmt in ROW_FORMATS:
        return NORMALISERS[fmt]
    return NORMALISERS["text"]


def fill_placeholders(row: dict, values: dict[str, str]) -> set[str]:
    """Fill `{{name}}` placeholders of the row's message contents from `values` (in place); the
    names left unfilled."""
    left: set[str] = set()

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name in values:
            return values[name]
        left.add(name)
        return match.group(0)

    for m in row["messages"]:
        if "{{" in m.get("content", ""):
            m["content"] = PLACEHOLDER.sub(sub, m["content"])
    return left


def quick_plain(text: str) -> dict | None:
    """The record of a JSONL line when orjson decodes it to a plain `{"messages": [...]}` row, else None.

    orjson decodes these lines ~1.4x faster than `json.loads` (a sixth of the stage's Python time
    on chat rows: docs/preprocess.md). Its result is used only for rows made of strings, where both
    decoders agree by the JSON spec (orjson turns integers over 64 bits into floats, and rejects NaN,
    lone surrogates and deep nesting that `json` accepts); every other line, valid or not, is
    decoded by `json.loads`, so what a row becomes and the errors a user sees do not change.
    """
    try:
        record = _orjson_loads(text)
    except ValueError:
        return None
    return record if is_plain_messages(record) else None


def prepare_batch(source_name: str, items: list[tuple[int, Any, str | None]], fmt: str, data, pre, lazy) -> tuple[list[RowOutcome], dict[str, int]]:
    """Outcomes of a batch of `(line, record, text)` items, and the renderer's counters for it."""
    normalise = normaliser(fmt, data)
    columns = data.columns
    fast_ok = fmt == "messages" and not columns
    outcomes: list[RowOutcome] = []
    rows: list[tuple[int, int, dict, str]] = []  # (index in outcomes, line, row, encoded)
    for line, record, text in items:
        plain = False
        if isinstance(record, Unparsed):
            if fast_ok:
                quick = quick_plain(text)
                if quick is not None:
                    record, plain = quick, True
            if not plain:
                try:
                    record = parse_jsonl_line(source_name, line, text, record.last)
                except FtpipeError as err:  # a truncated file: nothing follows
                    outcomes.append(RowOutcome("fatal", message=err.message, hint=err.hint))
                    break
        if isinstance(record, RowError):
            outcomes.append(RowOutcome("bad", line, error=record))
            continue
        if fast_ok and text is not None and "{{" not in text and not _ESCAPED_SURROGATE.search(text) and (plain or is_plain_messages(record)):
            # Already a plain {"messages": [{role, content}...]} line: keep its JSON text as is.
            row, encoded = record, text.strip()
        else:
            try:
                row = normalise(remap(record, columns))
            except RowError as err:
                if columns:
                    err = RowError(field_in_file(err.field, columns), err.what, err.reason)
                outcomes.append(RowOutcome("bad", line, error=err))
                continue
            left = fill_placeholders(row, data.placeholders)
            if left:
                outcomes.append(RowOutcome("placeholders", line, names=tuple(sorted(left))))
            try:
                encoded = encode_row(row)
            except RecursionError:  # e.g. tool definitions nested ~1000 deep
                outcomes.append(RowOutcome("bad", line, error=RowError("<row>", "nested too deeply")))
                continue
            bad = _SURROGATE.search(encoded)
            if bad:
                why = f"not valid Unicode: a lone surrogate \\u{ord(bad.group()):04x}"
                outcomes.append(RowOutcome("bad", line, error=RowError("<row>", why)))
                continue
        rows.append((len(outcomes), line, row, encoded))
        outcomes.append(_PENDING)
    if not rows:
        return outcomes, {}
    try:
        renderer = lazy.get()
    except FtpipeError as err:  # the tokenizer cannot load: reported at the first valid row
        first = rows[0][0]
        return [*outcomes[:first], RowOutcome("fatal", message=err.message, hint=err.hint)], {}
    before = dict(renderer.stats)
    if pre.tools_fallback == "text":
        for j, (index, line, row, encoded) in enumerate(rows):
            if renderer.tools_problem(row) is not None:
                row = tools_as_text(row)
                renderer.stats["tools_as_text"] = renderer.stats.get("tools_as_text", 0) + 1
                rows[j] = (index, line, row, encode_row(row))
    counts = renderer.measure([row for _, _, row, _ in rows])
    for (index, line, row, encoded), n in zip(rows, counts):
        if isinstance(n, Exception):
            reason = " ".join(str(n).split())[:200] or type(n).__name__
            outcomes[index] = RowOutcome("rejected", line, encoded, 0, message=reason)
        elif n > pre.max_length:
            if pre.overlength == "chunk" and fmt == "text" and len(row["messages"]) == 1:
                outcomes[index] = RowOutcome("chunked", line, encoded, n, chunks=tuple(chunk(row, renderer, pre.max_length)))
                continue
            fitted = truncate(row, renderer, pre.max_length) if pre.overlength in ("truncate", "chunk") else None
            if fitted is None:
                outcomes[index] = RowOutcome("too_long", line, encoded, n)
            else:
                outcomes[index] = RowOutcome("truncated", line, encoded, fitted[1], shortened=encode_row(fitted[0]))
        else:
            outcomes[index] = RowOutcome("ok", line, encoded, n)
    return outcomes, {k: v - before.get(k, 0) for k, v in renderer.stats.items()}


def chunk(row: dict, renderer: Renderer, max_length: int) -> list[tuple[str, int]]:
    """A one-message text row cut into consecutive windows that each render to <= max_length tokens.

    Cuts fall on token boundaries of the text encoded alone (so no text is lost or repeated); each
    window is then rendered with the chat template and counted, and shortened by the excess when
    tokens merge differently across the cut or the template's own tokens were underestimated.

    Returns:
        `[(JSON line, tokens)]` of the windows, in order.
    """
    message = row["messages"][0]
    text = message["content"]
    offsets = renderer.offsets(text)
    overhead = renderer.count([renderer.render({"messages": [{**message, "content": ""}]})])[0]
    if overhead >= max_length:
        return []
    window = max_length - overhead
    out: list[tuple[str, int]] = []
    start = 0
    while start < len(offsets):
        end = min(start + window, len(offsets))
        while True:
            piece = text[(offsets[start][0] if start else 0): offsets[end][0] if end < len(offsets) else len(text)]
            candidate = {**row, "messages": [{**message, "content": piece}]}
            n = renderer.count([renderer.render(candidate)])[0]
            if n <= max_length or end - start <= 1:
                break
            end = max(start + 1, end - (n - max_length))
        if n > max_length:  # one token of text is over the budget with the template: give up
            return []
        if piece.strip():
            out.append((encode_row(candidate), n))
        start = end
    return out


def truncate(row: dict, renderer: Renderer, max_length: int) -> tuple[dict, int] | None:
    """Keep the longest prefix of whole turns that ends with an assistant message and fits.

    Answers are never cut mid-way (that would teach the model to stop early); a row whose first
    exchange does not fit is dropped.
    """
    messages = row["messages"]
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1] if ends and ends[-1] == len(messages) - 1 else ends):
        candidate = {**row, "messages": messages[: end + 1]}
        try:
            text = renderer.render(candidate)
        except Exception:  # noqa: BLE001 - the template rejects this prefix: try a shorter one
            continue
        n = renderer.count([text])[0]
        if n <= max_length:
            return candidate, n
    return None


def worker_count(setting: int | None, path: Path | None) -> int:
    """Worker processes to start: the setting, or (None) for a big file on >= 3 cores one per core but
    one (up to 4), else 0."""
    if setting is not None:
        return setting
    try:
        size = path.stat().st_size if path is not None else 0
    except OSError:
        size = 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # The main process reads, dedupes and writes (about a third of the work): with 2 cores the
    # workers measured only 2% faster than in-process, for twice the memory (docs/preprocess.md).
    return min(cpus - 1, AUTO_MAX_WORKERS) if cpus >= AUTO_MIN_CPUS and size >= AUTO_MIN_BYTES else 0


# ---- worker processes -----------------------------------------------------------------------


def _cached(model_cfg, root: Path) -> bool:
    """True when the tokenizer cache holds this model's tokenizer (the workers need not import torch)."""
    from ftpipe.core.errors import FtpipeError
    from ftpipe.core.model_ref import resolve_model
    from ftpipe.data import tokenizer_cache

    try:
        path = tokenizer_cache.entry_path(resolve_model(model_cfg, root), model_cfg, root)
    except FtpipeError:
        return False  # the model does not resolve: the first batch reports it
    return path is not None and path.is_file()


_STATE: dict[str, Any] = {}


def _init(model_cfg, root: Path, fast: bool, data, pre) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])  # a worker only does row work: see few_collections
    logging.getLogger().addHandler(logging.NullHandler())  # counters travel back in the results
    _STATE.update(lazy=LazyRenderer(model_cfg, root, fast), data=data, pre=pre)


def _work(source_name: str, items: list, fmt: str) -> tuple[list[RowOutcome], dict[str, int]]:
    return prepare_batch(source_name, items, fmt, _STATE["data"], _STATE["pre"], _STATE["lazy"])


def _describe() -> dict[str, Any]:
    return _STATE["lazy"].record()


class Workers:
    """A pool of `n` spawned processes running `prepare_batch`, results returned in submission order."""

    def __init__(self, n: int, model_cfg, root: Path, fast: bool, data, pre) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.n = n
        self.data = data
        self.depth = 2 * n + 1  # batches in flight: bounded, so memory stays flat in rows
        context = multiprocessing.get_context("forkserver")
        # The fork server (one clean, single-threaded process) imports transformers (and torch, unless
        # the tokenizer is cached) once; every worker forked from it starts with them loaded.
        context.set_forkserver_preload(list(PRELOAD_CACHED if _cached(model_cfg, root) else PRELOAD))
        self.pool = ProcessPoolExecutor(n, mp_context=context, initializer=_init, initargs=(model_cfg, root, fast, data, pre))

    def map(self, source_name: str, batches: Iterable[list], fmt: str) -> Iterator[tuple[list[RowOutcome], dict[str, int]]]:
        pending: deque = deque()
        for batch in batches:
            pending.append(self.pool.submit(_work, source_name, batch, fmt))
            if len(pending) >= self.depth:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def record(self) -> dict[str, Any]:
        """The tokenizer record, as a worker loaded it."""
        return self._result(self.pool.submit(_describe))

    @staticmethod
    def _result(future):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise StageError(
                "a preprocess worker process died (out of memory, or killed)",
                hint="rerun; or use fewer workers: --set preprocess.workers=0",
            ) from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def batches(records: Iterable, size: int) -> Iterator[list]:
    """`records` in lists of `size`."""
    batch: list = []
    for item in records:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
