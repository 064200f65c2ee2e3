"""Translate `pip config list` (stdin) into uv options (stdout, one word per line).

uv does not read pip.conf or PIP_* variables, so scripts/bootstrap.sh passes it the indexes pip is
configured with, so both installers see the same packages:

    python -m pip config list | python scripts/pip_config_to_uv.py

index-url, extra-index-url, find-links, constraint and trusted-host become the uv options of the
same meaning; no-index becomes --no-index; cert is printed as `--cert=PATH`, which bootstrap.sh
turns into SSL_CERT_FILE (uv's way to trust a private CA). Precedence as pip's: environment
(`:env:`), then the `install` section, then `global`. Standard library only (runs before any venv).
"""

from __future__ import annotations

import shlex
import sys

OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
RANK = {":env:": 0, "install": 1, "global": 2}


def translate(listing: str) -> list[str]:
    """uv arguments for a `pip config list` output, e.g. `global.find-links='/wheels'`."""
    found: dict[str, tuple[int, list[str]]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        scope, _, name = key.rpartition(".")
        rank = RANK.get(scope, 3)
        words = " ".join(shlex.split(value)).split()  # pip prints the value quoted; lists are space-separated
        if name not in found or rank < found[name][0]:
            found[name] = (rank, words)
    args: list[str] = []
    for name, flag in OPTIONS.items():
        for value in found.get(name, (0, []))[1]:
            args += [flag, value]
    if found.get("no-index", (0, []))[1][:1] in (["1"], ["true"], ["yes"], ["on"]):
        args.append("--no-index")
    if found.get("cert", (0, []))[1]:
        args.append("--cert=" + found["cert"][1][0])
    return args


if __name__ == "__main__":
    print("\n".join(translate(sys.stdin.read())))
