"""Shared fixtures: the tiny local models (built once per session) and a CLI runner.

Tests never reach beyond loopback: HF_HUB_OFFLINE=1 is forced here as well as in scripts/test.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A pytest-xdist worker starts with COLUMNS=80 and LINES=24 in its environment, and rich fixes a
# console's width from COLUMNS when the console is built (at import): the CLI's tables would then wrap
# at 80 columns whatever run_cli sets. Without them, the width is read at each print (run_cli: 200).
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)

REPO = Path(__file__).resolve().parents[1]

# The SFT -> DPO projects, registered here so tests/eval and tests/serve share one build per session.
from tests.dpo_fixture import sft_dpo_project, tuned_project  # noqa: E402, F401


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


# Commands whose work happens in other processes that inherit the real stdout/stderr (another stage
# environment, a pipeline of stage processes, a server): run_cli starts these in a subprocess, so
# their whole output is captured. The rest run in this process (no interpreter start, no second
# import of torch), through the same entry point and error handler as the console script.
SUBPROCESS_COMMANDS = frozenset({"run", "demo", "serve", "smoke-test", "convert-awq", "export-gguf"})
IN_PROCESS = os.environ.get("FTPIPE_TEST_CLI", "in-process") == "in-process"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900,
            process: bool | None = None) -> CliResult:
    """Run `ftpipe ARGS` (exit code, stdout, stderr) through `ftpipe.cli.main:main`.

    In this process unless `process=True`, the command is one of SUBPROCESS_COMMANDS, or the
    suite runs with FTPIPE_TEST_CLI=subprocess; then as `python -m ftpipe ARGS` in a subprocess
    (a test of the process boundary itself: exit codes seen by a shell, signals, a killed process).
    """
    if process is None:
        process = not IN_PROCESS or (bool(args) and args[0] in SUBPROCESS_COMMANDS)
    full_env = {"COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    if process:
        proc = subprocess.run(
            [sys.executable, "-m", "ftpipe", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
            env={**{k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}, **full_env},
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)
    return _run_in_process(list(args), cwd or REPO, full_env)


def _run_in_process(args: list[str], cwd: Path, env: dict[str, str]) -> CliResult:
    """`ftpipe ARGS` in this process: the console script's `main()` with sys.argv, the working
    directory and the environment set as a shell would, stdout and stderr captured; the process
    state a command may change (environment, working directory, logging, signal handlers, torch
    threads) is put back afterwards."""
    import logging
    import signal
    import traceback

    from click.testing import CliRunner

    from ftpipe.cli.main import main

    saved_environ, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    code = 0
    with CliRunner().isolation(env={"FTPIPE_DEBUG": None, **env}) as (out, err, _):
        sys.argv = ["ftpipe", *args]
        os.chdir(cwd)
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                sys.stderr.write(f"{exc.code}\n")
        except BaseException:  # noqa: BLE001 - what the console script would die of: exit 1, traceback on stderr
            code = 1
            traceback.print_exc(file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            for handler in [h for h in root.handlers if h not in saved_handlers]:
                root.removeHandler(handler)
            root.setLevel(saved_level)
            for sig, handler in saved_signals.items():
                signal.signal(sig, handler)
            if threads is not None:
                torch.set_num_threads(threads)
        stdout = out.getvalue().decode("utf-8", "replace")
        stderr = err.getvalue().decode("utf-8", "replace")
    os.environ.clear()
    os.environ.update(saved_environ)
    return CliResult(code, stdout, stderr)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with tied embeddings, built locally (no hub)."""
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-llama")
    build(out, TinyModelConfig(arch="llama", vocab_size=2048, tie_word_embeddings=True),
          [REPO / "data/demo/sentiment.jsonl"])
    return out


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 with untied embeddings."""
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-qwen2")
    build(out, TinyModelConfig(arch="qwen2", vocab_size=2048, tie_word_embeddings=False),
          [REPO / "data/demo/sentiment.jsonl"])
    return out


FAMILY_NAMES = ("llama3", "qwen2.5", "qwen3", "phi3.5", "mistral", "gemma")


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """`family_model(name)`: the tiny model of a real family (real tokenizer and chat template,
    2 layers, width 128), built once per session on first use. The llama.cpp material is fetched
    into the repository's .cache/ftpipe (as `ftpipe make-tiny-model --family` does in a project)."""
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"family-{name}")
            build(out, TinyModelConfig(family=name, num_layers=2), root=REPO)
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def session_stamp() -> str:
    """An id of this pytest session (results written by one test, checked by another)."""
    import time

    return f"{os.getpid()}-{time.time():.0f}"


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    """A project folder: config.yaml pointing at the tiny model and a copy of the demo data (not prepared)."""
    from tests.project_factory import make_project

    return make_project(tmp_path, tiny_model_dir, {
        "preprocess": {"max_length": 256},
        "finetune": {"max_steps": 20, "batch_size": 4, "max_length": 256, "logging_steps": 5, "save_steps": 10},
    })


# Parallel runs (scripts/test.sh: pytest-xdist, two workers). Each test file is one unit of work that
# runs on one worker, in file order (module fixtures built once, the docs' steps in sequence), except:
# - files sharing an expensive session fixture form one unit (a session fixture is built once per
#   worker): the tuned SFT -> DPO project (tests/dpo_fixture.py) and the evaluation of it; and the
#   family matrix with the test of docs/families.md that reads this session's rows;
# - the real model's documented steps (tests/docs/test_docs_run.py) are a unit beside the other steps.
# The longest units are handed out first, so that none starts last and runs alone. The scheduler is
# ours (pytest_xdist_make_scheduler below) because xdist's `loadgroup` has no effect under pytest 9.2
# (it renames `item._nodeid`, which pytest 9.2 no longer reads) and `load` would split a file.
SHARED_FIXTURE_UNITS = {
    "family-matrix": ("tests/e2e/test_family_matrix.py", "tests/e2e/test_family_matrix_docs.py"),  # rows, then the docs' table
    "tuned-project": ("tests/eval/test_evaluate.py", "tests/eval/test_general_text.py", "tests/eval/test_preference.py",
                      "tests/eval/test_report.py", "tests/eval/test_gguf_eval.py", "tests/serve/test_serve_adapters.py",
                      "tests/core/test_stage_contract.py"),
}
FUNCTION_UNITS = {"tests/docs/test_docs_run.py::test_real_model_doc_command_runs": "real-model"}
LONGEST_FIRST = ("real-model", "tests/docs/test_docs_run.py", "family-matrix",
                 "tests/ingest/test_round_trip.py", "tests/e2e/test_demo.py", "tuned-project",
                 "tests/reliability/test_crash_finetune.py", "tests/training/test_finetune_dpo.py",
                 "tests/serve/test_serve_awq.py", "tests/cli/test_check_template.py")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to (see SHARED_FIXTURE_UNITS)."""
    path, _, rest = nodeid.partition("::")
    function = f"{path}::{rest.split('[')[0]}"
    if function in FUNCTION_UNITS:
        return FUNCTION_UNITS[function]
    return next((unit for unit, files in SHARED_FIXTURE_UNITS.items() if path in files), path)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """The longest units first; the order of tests within a unit is kept."""
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    units = [work_unit(item.nodeid) for item in items]
    first_seen = {unit: i for i, unit in reversed(list(enumerate(units)))}
    order = sorted(range(len(items)), key=lambda i: (rank.get(units[i], len(rank)), first_seen[units[i]], i))
    items[:] = [items[i] for i in order]


@pytest.hookimpl(optionalhook=True)  # xdist's hook: without xdist (or `-p no:xdist`) it is simply unused
def pytest_xdist_make_scheduler(config, log):
    """Whole units of work per worker, in collection order (any `--dist` given is overridden)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


# Time per tier (the first folder under tests/, fast and slow apart), printed at the end of every run
# (`bash scripts/test.sh` shows it; docs/setup.md records it): where the suite's minutes go.
_TIER_SECONDS: dict[tuple[str, str], list[float]] = {}


def pytest_runtest_logreport(report) -> None:
    parts = report.nodeid.split("::")[0].split("/")
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "tests"
    speed = "slow" if "slow" in report.keywords else "fast"
    entry = _TIER_SECONDS.setdefault((tier, speed), [0.0, 0])
    entry[0] += report.duration
    entry[1] += report.when == "call"


_STARTED = [0.0]


def pytest_sessionstart(session) -> None:
    import time

    _STARTED[0] = time.monotonic()


def pytest_terminal_summary(terminalreporter, config) -> None:
    import time

    if not _TIER_SECONDS or hasattr(config, "workerinput"):
        return
    total = sum(seconds for seconds, _ in _TIER_SECONDS.values())
    terminalreporter.section("time per tier (set-up, call and teardown of each test)")
    for (tier, speed), (seconds, count) in sorted(_TIER_SECONDS.items(), key=lambda kv: -kv[1][0]):
        terminalreporter.write_line(f"{tier + ' (' + speed + ')':<22} {count:>4} tests {_clock(seconds):>8} "
                                    f"{100 * seconds / total:5.1f} %")
    terminalreporter.write_line(f"{'all':<22} {sum(c for _, c in _TIER_SECONDS.values()):>4} tests {_clock(total):>8}")
    workers = getattr(config.option, "numprocesses", None) or 0
    terminalreporter.write_line(f"wall clock {_clock(time.monotonic() - _STARTED[0])} with "
                                + (f"{workers} workers (the tiers' times add up the workers' time)" if workers else "one process"))


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"
