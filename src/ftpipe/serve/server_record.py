"""The record of a running server and its log: logs/<run>/serve/server.json and server.log.

Written by `ftpipe serve` (ftpipe/serve/serve.py), read by `ftpipe serve stop` and by
`ftpipe smoke-test` (which artifact the server really serves, and, when the server fails, the line
of its log that says why). A record whose pid no longer runs a server is stale and removed.

    ftpipe serve --config debug_config.yaml --detach    # writes logs/<run>/serve/server.json
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.core.fsutil import read_json
from ftpipe.core.runs import RunDir

log = logging.getLogger(__name__)

STAGE = "serve"
STATE_FILE = "server.json"
SERVER_LOG = "server.log"


@dataclass
class ServerState:
    """The content of logs/<run>/serve/server.json while a server runs.

    `extra` holds what a reader needs beyond the address: startup_seconds, and when `serve
    --fallback` served another artifact than serve.artifact, requested_artifact and
    substitution (why).
    """

    pid: int
    run: str
    artifact: str
    kind: str
    model_name: str
    host: str
    port: int
    url: str
    started_at: str
    detached: bool
    log: str
    extra: dict = field(default_factory=dict)


def state_path(run: RunDir) -> Path:
    return run.log_dir(STAGE) / STATE_FILE


def server_log_path(run: RunDir) -> Path:
    return run.log_dir(STAGE) / SERVER_LOG


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone; one of ours is reaped)."""
    try:
        # A child of ours that exited stays a zombie until reaped: reap it if it is ours.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie not ours to reap still counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_state(run: RunDir, remove_stale: bool = True) -> ServerState | None:
    """The recorded server of a run, if its pid still runs that server.

    Args:
        remove_stale: remove an unreadable or stale server.json (False: only read, for a stage's
            pure `check`).
    """
    path = state_path(run)
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    try:
        state = ServerState(**data)
    except TypeError:
        if remove_stale:
            log.info("removing unreadable %s", run.project.rel(path))
            path.unlink(missing_ok=True)
        return None
    cmd = _cmdline(state.pid)
    if not alive(state.pid) or ("vllm" not in cmd and "llama_cpp" not in cmd):
        if remove_stale:
            log.info("removing stale %s (pid %d is not running a server)", run.project.rel(path), state.pid)
            path.unlink(missing_ok=True)
        return None
    return state


# vLLM prefixes each line of its workers with "(Worker pid=N) ERROR 12-07 00:04:52 [file.py:123] ".
_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?((DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
# An exception line of a Python traceback: "RuntimeError: ...", "vllm.v1.engine.exceptions.EngineDeadError: ...".
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)): (.+)$")
TAIL_BYTES = 1 << 20
FAILURE_LINES = 400


def log_size(path: Path) -> int:
    """The log's size now (0 when absent): where the lines of what happens next begin."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def root_cause(path: Path, since: int = 0) -> str | None:
    """The line of a server log that says why the server failed, without its logging prefix.

    With `since` (a `log_size` taken before the failing requests): the first exception line
    written after it (the first error is the cause; the ones after it are its consequences: vLLM's
    "Worker failed with error ..." then "EngineDeadError"), None when none was. Without: the first
    exception line of the last failure in the log's last MiB, None when the log has no exception line.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            start = since if 0 < since <= size else max(0, size - TAIL_BYTES)
            handle.seek(max(start, size - TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    lines = [_PREFIX.sub("", line).strip() for line in text.splitlines()]
    found = [i for i, line in enumerate(lines) if _EXCEPTION.match(line)]
    if not found:
        return None
    if since and since <= size:
        return lines[found[0]]
    # No marker: the first exception line of the last failure (its exception lines lie within
    # FAILURE_LINES lines of each other: a worker's error, the engine's, the API server's).
    last = found[-1]
    return lines[next(i for i in found if i >= last - FAILURE_LINES)]
