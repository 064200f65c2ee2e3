"""Environment set-up: uv (what scripts/bootstrap.sh does) against pip (what it did), same locks.

    python3 bench/installers.py                    # train, awq, serve from empty caches
    python3 bench/installers.py --envs train awq

For each environment, in alternating order (pip first, then uv first, ...), one fresh venv per
installer from `requirements/<env>.lock`, each installer with its own cache that starts empty for
the run and is shared by the environments after the first (as on a user's machine):

- pip: `python -m venv`, then the lock's torch line, then `pip install -r` the lock (pip compiles
  `.pyc` files as it installs) - scripts/bootstrap.sh before uv;
- uv: `uv venv --seed`, then `uv pip install --compile-bytecode -r` the lock with the indexes pip is
  configured with (scripts/pip_config_to_uv.py) - scripts/bootstrap.sh now.

The compiling environment (gguf: minutes of llama.cpp compile whichever installer runs it) is left
out by default; `--envs gguf` measures it too. Standard library only. One round per environment:
cold caches cannot be repeated in place, so run it twice to see the spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def uv_binary() -> str:
    uv = REPO / ".uv/bin/uv"
    if not uv.exists():
        sys.exit("no .uv/bin/uv: run `bash scripts/bootstrap.sh train` once (it installs uv)")
    return str(uv)


def uv_index_args() -> list[str]:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    words = subprocess.run([sys.executable, str(REPO / "scripts/pip_config_to_uv.py")], input=listing,
                           capture_output=True, text=True, check=True).stdout.split()
    return ["--index-strategy", "unsafe-best-match", *[w for w in words if not w.startswith("--cert=")]]


def with_pip(env: str, venv: Path, cache: Path) -> None:
    lock = REPO / "requirements" / f"{env}.lock"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", "--cache-dir", str(cache)]
    torch = [line for line in lock.read_text().splitlines() if line.startswith("torch==")]
    if torch:
        subprocess.run([*pip, *torch], check=True, stderr=subprocess.DEVNULL)
    subprocess.run([*pip, "-r", str(lock)], check=True, stderr=subprocess.DEVNULL)


def with_uv(env: str, venv: Path, cache: Path) -> None:
    lock = REPO / "requirements" / f"{env}.lock"
    uv, extra = uv_binary(), {**os.environ, "UV_CACHE_DIR": str(cache)}
    subprocess.run([uv, "venv", "-q", "--seed", "--python", sys.executable, str(venv)], check=True, env=extra)
    settings = []
    for line in lock.read_text().splitlines():
        if line.startswith("# config-settings: "):
            settings += ["--config-settings-package", line.removeprefix("# config-settings: ").replace("@REPO@", str(REPO))]
    subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", str(venv / "bin/python"),
                    *uv_index_args(), *settings, "-r", str(lock)], check=True, env=extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["train", "awq", "serve"])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ftpipe-installers-"))
    installers = {"pip": with_pip, "uv": with_uv}
    results: dict[tuple[str, str], float] = {}
    try:
        for i, env in enumerate(args.envs):
            order = ["pip", "uv"] if i % 2 == 0 else ["uv", "pip"]
            for name in order:
                venv = base / f"{name}-{env}"
                started = time.monotonic()
                installers[name](env, venv, base / f"{name}-cache")
                results[(env, name)] = time.monotonic() - started
                print(f"{env:>6} {name:>3}: {results[(env, name)]:6.1f} s", flush=True)
                shutil.rmtree(venv)
        print(f"\n{'environment':<12} {'pip (s)':>8} {'uv (s)':>8} {'pip / uv':>9}")
        for env in args.envs:
            pip_s, uv_s = results[(env, "pip")], results[(env, "uv")]
            print(f"{env:<12} {pip_s:8.1f} {uv_s:8.1f} {pip_s / uv_s:8.1f}x")
        total_pip = sum(v for (e, n), v in results.items() if n == "pip")
        total_uv = sum(v for (e, n), v in results.items() if n == "uv")
        print(f"{'all':<12} {total_pip:8.1f} {total_uv:8.1f} {total_pip / total_uv:8.1f}x   (baseline: pip, as bootstrap.sh was)")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
