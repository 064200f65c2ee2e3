"""Serve the TensorBoard logs of one run or of all runs (`ftpipe tensorboard`).

Each `finetune-sft` run writes its events to outputs/<run>/trainer_state/tensorboard/ (and
`finetune-dpo` to outputs/<run>/dpo_trainer_state/tensorboard/, shown as `<run>-dpo`); this
starts TensorBoard from the training environment with one named entry per run, bound to
127.0.0.1 unless told otherwise, and blocks until Ctrl-C.

    ftpipe tensorboard --run my-run --port 6006
    ftpipe tensorboard --all
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.runs import Project, open_run
from ftpipe.training.harness import TENSORBOARD_DIR

log = logging.getLogger(__name__)


def event_dirs(project: Project, run_name: str | None, all_runs: bool) -> dict[str, Path]:
    """{run name: its tensorboard folder} for `--run NAME` (or the latest run) or `--all`.

    Raises:
        InputError: no such run, or no TensorBoard events yet (names `ftpipe finetune-sft`).
    """
    if all_runs:
        names = project.run_names()
    else:
        names = [open_run(project, run_name).name]
    found = {}
    for name in names:
        # finetune-sft's events, and finetune-dpo's (outputs/<run>/dpo_trainer_state/) as `<run>-dpo`.
        for entry, state in ((name, "trainer_state"), (f"{name}-dpo", "dpo_trainer_state")):
            folder = project.outputs / name / state / TENSORBOARD_DIR
            if folder.is_dir() and any(folder.rglob("events.out.tfevents.*")):
                found[entry] = folder
    if not found:
        what = "any run" if all_runs else f"run {names[0]}"
        raise InputError(f"no TensorBoard events in {what} (outputs/<run>/trainer_state/{TENSORBOARD_DIR}/)",
                         hint="ftpipe finetune-sft")
    return found


def command(dirs: dict[str, Path], host: str, port: int) -> list[str]:
    """The TensorBoard argv: one named entry per run."""
    spec = ",".join(f"{name}:{path}" for name, path in sorted(dirs.items()))
    return [sys.executable, "-m", "tensorboard.main", "--logdir_spec", spec, "--host", host, "--port", str(port),
            "--reload_interval", "5"]


def serve(project: Project, run_name: str | None, all_runs: bool, host: str = "127.0.0.1", port: int = 6006) -> int:
    """Run TensorBoard in the foreground until it exits or Ctrl-C; returns its exit code.

    Raises:
        InputError: nothing to show.
        StageError: TensorBoard is not installed in this environment.
    """
    import importlib.util

    dirs = event_dirs(project, run_name, all_runs)
    if importlib.util.find_spec("tensorboard") is None:
        raise StageError("TensorBoard is not installed in this environment", hint="bash scripts/bootstrap.sh train")
    argv = command(dirs, host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("TensorBoard will listen on %s: reachable from other machines, without authentication", host)
    log.info("TensorBoard for %s at http://%s:%d/ (Ctrl-C to stop)", ", ".join(sorted(dirs)), host, port)
    proc = subprocess.Popen(argv)
    stopped = False

    def _stop(_signum, _frame) -> None:
        # SIGTERM (docker stop, a test's terminate()) must not orphan the TensorBoard process.
        nonlocal stopped
        stopped = True
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stopped = True
        proc.terminate()
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 0 if stopped else code
