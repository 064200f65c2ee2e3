"""A newcomer's first run: `bash scripts/demo.sh` from a fresh clone with empty caches, phase by phase.

    python3 bench/first_run.py                 # clone this checkout's HEAD into a temp folder, run it twice
    python3 bench/first_run.py --keep /tmp/fr  # keep the clone and its caches there
    python3 bench/first_run.py --commit REV    # another commit (a baseline: alternate the two)

Clones the committed HEAD (`git clone --no-hardlinks`), points every cache the run uses at new empty
folders (uv, pip, Hugging Face, XDG, torch), runs `bash scripts/demo.sh` and prints each line with
its time since the start. Then the phases:

- each environment: when its build started and ended (foreground, or `--background` from its
  logs/bootstrap/<env>.log and the finish marker bootstrap.sh writes),
- each stage (`>> stage` to `stage: completed`), and how long a stage waited for an environment,
- the first logged training step (finetune-sft's `step N/M loss` line in its run.log),
- whether report.html exists and shows the export-gguf stage,
- the second run of `bash scripts/demo.sh` in the same clone (everything skipped).

Standard library only: runs with the system Python before any environment exists. Wall-clock
figures from a shared 2-core machine are noisy; run it on an otherwise idle machine.
Targets: report (with the export-gguf stage) within 300 s (issue 28; 600 s before), first training step
within 180 s, second run within 10 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"report": 300.0, "first_step": 180.0, "second_run": 10.0}


def run_streaming(argv: list[str], cwd: Path, env: dict[str, str], t0: float) -> tuple[int, list[tuple[float, str]]]:
    """Run argv, echo each output line with its offset from t0; returns (exit code, [(offset, line)])."""
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        offset = time.time() - t0
        line = raw.rstrip("\n")
        lines.append((offset, line))
        print(f"[{offset:6.1f}s] {line}", flush=True)
    return proc.wait(), lines


def clean_env(caches: Path) -> dict[str, str]:
    """This environment with every cache the run touches pointed at an empty folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FTPIPE_VENV_ROOT", "PYTHONPATH")}
    for name, sub in (("UV_CACHE_DIR", "uv"), ("PIP_CACHE_DIR", "pip"), ("HF_HOME", "hf"),
                      ("XDG_CACHE_HOME", "xdg"), ("TORCH_HOME", "torch"), ("TRITON_CACHE_DIR", "triton"),
                      ("VLLM_CACHE_ROOT", "vllm")):
        (caches / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(caches / sub)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv" not in p)
    return env


def env_phases(clone: Path, lines: list[tuple[float, str]], t0: float) -> list[tuple[str, float, float]]:
    """(environment, start offset, end offset) for every environment built."""
    phases = []
    started: dict[str, float] = {}
    for offset, line in lines:
        if m := re.match(r"bootstrap: building (\.venv\S*) from ", line):
            started[m[1]] = offset
        elif m := re.match(r"bootstrap: (\.venv\S*) built in (\d+) s", line):
            phases.append((m[1], started.get(m[1], offset - int(m[2])), offset))
        elif m := re.match(r"bootstrap: building (\.venv\S*) in the background \(pid \d+, log: (\S+)\)", line):
            log = clone / m[2]
            marker = clone / m[1] / ".ftpipe-lock"
            built = re.search(r"built in (\d+) s", log.read_text()) if log.is_file() else None
            end = marker.stat().st_mtime - t0 if marker.is_file() else float("nan")
            phases.append((f"{m[1]} (background)", offset, end if built else float("nan")))
    return phases


def stage_phases(lines: list[tuple[float, str]]) -> list[tuple[str, float, float, str]]:
    """(stage, start, end, status) from the demo's `>> stage` / `stage: status (N s)` lines."""
    out, current = [], None
    for offset, line in lines:
        if m := re.match(r">> (\S+)$", line.strip()):
            current = (m[1], offset)
        elif current and (m := re.match(rf"{re.escape(current[0])}: (\w+) \(", line.strip())):
            out.append((current[0], current[1], offset, m[1]))
            current = None
    return out


def first_training_step(clone: Path, t0: float) -> tuple[float, str] | None:
    """Offset and text of the first `step N/M loss` line any finetune-sft run.log holds."""
    best = None
    for log in clone.glob("logs/**/run.log"):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO ftpipe\.training\.[a-z_]+: (step \d+/\d+ loss .*)", line)
            if m:
                when = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0
                if best is None or when < best[0]:
                    best = (when, m[2])
                break
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="make the clone and caches here and keep them (must not exist)")
    parser.add_argument("--commit", default="HEAD", help="the commit to run (default HEAD): a baseline to alternate with")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="ftpipe-first-run-"))
    base.mkdir(parents=True, exist_ok=args.keep is None)
    clone, caches = base / "ftpipe", base / "caches"
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.commit], capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", head], check=True)
        env = clean_env(caches)
        print(f"first run of {head} in a fresh clone, empty caches, {os.cpu_count()} CPUs", flush=True)
        t0 = time.time()
        code, lines = run_streaming(["bash", "scripts/demo.sh"], clone, env, t0)
        total = time.time() - t0
        if code != 0:
            print(f"first run failed with exit {code} after {total:.0f} s")
            return 1
        step = first_training_step(clone, t0)
        t1 = time.time()
        code2, lines2 = run_streaming(["bash", "scripts/demo.sh"], clone, env, t1)
        second = time.time() - t1

        print("\nphase                                   start     end   seconds")
        for name, start, end in env_phases(clone, lines, t0):
            print(f"env   {name:<32} {start:7.1f} {end:7.1f} {end - start:9.1f}")
        waits = [(o, l) for o, l in lines if "waiting for environment" in l or "is ready (waited" in l]
        for name, start, end, status in stage_phases(lines):
            print(f"stage {name:<32} {start:7.1f} {end:7.1f} {end - start:9.1f}  {status}")
        for offset, line in waits:
            print(f"      {line.strip()[:100]}  (at {offset:.0f} s)")
        reports = sorted(clone.glob("outputs/*/report.html"))
        gguf = bool(reports) and "export-gguf" in reports[-1].read_text(encoding="utf-8", errors="replace")
        print(f"\nreport.html: {'yes' if reports else 'NO'}, with the export-gguf stage: {'yes' if gguf else 'NO'}")
        print(f"first training step: {'%.0f s (%s)' % step if step else 'NOT FOUND'}")
        print(f"first run (clone to report): {total:.0f} s = {total / 60:.1f} min (target <= {TARGETS['report']:.0f} s)")
        print(f"second run: {second:.1f} s, exit {code2} (target <= {TARGETS['second_run']:.0f} s)")
        ok = (reports and gguf and step is not None and total <= TARGETS["report"] and step[0] <= TARGETS["first_step"]
              and code2 == 0 and second <= TARGETS["second_run"])
        print("verdict:", "all targets met" if ok else "a target was missed")
        return 0 if ok else 1
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
