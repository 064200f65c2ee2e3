"""What both preprocess stages share to turn streamed rows into prepared/<name>/.

`preprocess-sft` (ftpipe/data/preprocess_sft.py) and `preprocess-dpo` (ftpipe/data/preprocess_dpo.py)
read their rows the same way: each kept row goes, as one JSON line, to a temporary file with its token
count (`KeptRows`), exact duplicates are dropped (`Seen`), bad rows are counted by reason (`RowStats`);
then the kept rows are split by seed (`val_flags`) and written through hashing writers (`RowWriter`),
and metadata.json summarises the token lengths (`token_stats`). Neither stage module imports the
other: what they share lives here.

    ftpipe preprocess-sft --config debug_config.yaml
    ftpipe preprocess-dpo --config config.yaml --source data/prefs.jsonl
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project
from ftpipe.data.formats import RowError
from ftpipe.data.readers import Source

log = logging.getLogger(__name__)

ERRORS_KEPT = 100  # bad-row messages kept in metadata.json (all are counted)
NOT_ERRORS = ("no_annotation",)  # dropped, but not a malformed row: not shown, not --strict
HIST_BINS = 20


def existing_file(project: Project, path: str, key: str, what: str = "dataset") -> Path:
    """`path` (config key `key`) resolved against the project root.

    Raises:
        InputError: no such file, naming the key.
    """
    resolved = project.resolve(path)
    if not resolved.is_file():
        raise InputError(f"{key} {path}: {what} file not found", hint=f"check {key} (relative to {project.root})")
    return resolved


class KeptRows(NamedTuple):
    """The rows kept from one source: a temporary file of JSON lines and their token counts, in order."""

    path: Path
    lengths: array  # array("I"): one token count per line of `path`


def discard(kept: dict[str, KeptRows]) -> None:
    """Delete the temporary files of kept rows."""
    for rows in kept.values():
        rows.path.unlink(missing_ok=True)


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
    logger = log  # a stage's subclass logs its bad rows under the stage's own logger

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
            self.logger.warning("%s", message)
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


def val_flags(n: int, fraction: float, seed: int):
    """Which of `n` rows go to validation: a seeded choice of `round(n * fraction)` of them (at least
    one and never all, when `fraction` > 0), as a numpy bool array (one byte per row, not a set)."""
    import numpy as np

    n_val = min(max(1, round(n * fraction)), n - 1) if fraction > 0 else 0
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, n_val, replace=False)] = True
    return is_val


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
