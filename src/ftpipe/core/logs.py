"""Stage logging: `run.log` (library logging) and `console.log` (what the user saw), both redacted.

Library code only logs (`logging.getLogger(__name__)`); the CLI prints through a rich Console
whose file is `console_stream`, which copies everything (ANSI codes stripped) into the current
stage's console.log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from pathlib import Path
from typing import Iterator, TextIO

from ftpipe.core.secrets import RedactingFilter, redact, register_env_secrets

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Set by a stage to its run.log for the worker processes it starts (training ranks, eval worker).
WORKER_LOG_ENV = "FTPIPE_WORKER_LOG"
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\r")


class TeeStream(io.TextIOBase):
    """A text stream writing to the terminal and, while a stage runs, to its console.log."""

    def __init__(self, stream: str = "stdout") -> None:
        self._stream = stream
        self._copy: TextIO | None = None

    @property
    def primary(self) -> TextIO:
        # Looked up at each write so pytest's capture and redirections keep working. While a rich
        # Progress/Live redirects sys.stdout to itself, write to the file it wraps (else: a loop).
        stream = getattr(sys, self._stream)
        return getattr(stream, "rich_proxied_file", stream)

    def write(self, text: str) -> int:
        text = redact(text)
        self.primary.write(text)
        if self._copy is not None:
            self._copy.write(_ANSI.sub("", text))
            self._copy.flush()
        return len(text)

    def flush(self) -> None:
        self.primary.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.primary, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.primary.fileno()

    @contextlib.contextmanager
    def copy_to(self, path: Path) -> Iterator[None]:
        """While inside, also append what is written to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = self._copy
        with open(path, "a", encoding="utf-8") as fh:
            self._copy = fh
            try:
                yield
            finally:
                self._copy = previous


console_stream = TeeStream("stdout")  # results, tables, progress
console_err_stream = TeeStream("stderr")  # log lines and errors: stdout stays clean for --format json


@contextlib.contextmanager
def stage_logging(log_dir: Path, level: int = logging.INFO) -> Iterator[Path]:
    """Send all logging to `<log_dir>/run.log` and the console copy to `console.log` while inside.

    Yields:
        The run.log path.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    run_log = log_dir / "run.log"
    handler = logging.FileHandler(run_log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactingFilter())
    handler.setLevel(level)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    try:
        with console_stream.copy_to(log_dir / "console.log"), console_err_stream.copy_to(log_dir / "console.log"):
            yield run_log
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()


def worker_start(argv: list[str] | None, module: str, doc: str, written_by: str, result: str, prefix: str):
    """The start of a spec-in, result-out worker a stage runs in another environment
    (`python -m MODULE --spec SPEC --out RESULT`): its arguments parsed, its logging set up
    (`worker_logging`, into the run.log the stage names in `WORKER_LOG_ENV`).

    Returns:
        The parsed arguments: `.spec` and `.out` (Paths).
    """
    import argparse
    import os

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help=f"spec JSON written by {written_by}")
    parser.add_argument("--out", required=True, type=Path, help=f"where to write the {result}")
    args = parser.parse_args(argv)
    worker_logging(os.environ.get(WORKER_LOG_ENV), prefix=prefix)
    return args


def worker_logging(log_file: Path | str | None, prefix: str = "", level: int = logging.INFO) -> None:
    """Logging of a worker process: the one set-up of every `python -m ftpipe...` entry point a stage starts.

    Lines go to stderr (the stage copies it to a worker log) in `LOG_FORMAT`, each starting with
    `prefix` (e.g. "[rank 1] "), and, when `log_file` is given (the stage's run.log, from
    `WORKER_LOG_ENV`; pass it from rank 0 / the single worker only), are appended there too,
    formatted as the stage's own lines. Both are redacted. A second call replaces the first's handlers.
    """
    register_env_secrets()  # the worker did not load the config: at least the credential env vars
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "ftpipe_worker", False)]:
        root.removeHandler(old)
        old.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(prefix + LOG_FORMAT))
    handlers: list[logging.Handler] = [stream]
    if log_file:
        run_log = logging.FileHandler(log_file, encoding="utf-8")  # append mode: the stage writes it too
        run_log.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(run_log)
    for handler in handlers:
        handler.addFilter(RedactingFilter())
        handler.ftpipe_worker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
