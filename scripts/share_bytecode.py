"""Give a freshly installed venv its .pyc files, reusing those of the checkout's other environments.

    VENV/bin/python scripts/share_bytecode.py VENV OTHER_VENV [OTHER_VENV ...]

Run by bootstrap.sh with the new venv's interpreter, after `uv pip install` (which installs without
`--compile-bytecode`). uv links every installed file from its cache, so the environments share one
inode per identical source file (torch, transformers, numpy, ... are in four of them). A .pyc is
valid for any path of the same source: its header holds the source's mtime and size (the same for
one inode) and the interpreter sets the code's file name from the path it was loaded for. So for
every source that is the very same file in a finished environment, its .pyc is hard-linked (copied
across file systems); everything else is compiled as `--compile-bytecode` would. On a first run
this halves the bytecode work of the stage environments built after the training one
(docs/setup.md). Environments that are not finished (no `.ftpipe-lock`) are not used.

Standard library only (it runs before anything else is in the venv's path).
"""

from __future__ import annotations

import compileall
import py_compile
import importlib.util
import os
import shutil
import struct
import sys
import sysconfig
from pathlib import Path


def _site_packages(prefix: Path) -> Path:
    """This interpreter's purelib folder, moved to `prefix` (the same layout for every venv of one Python)."""
    own = Path(sysconfig.get_paths()["purelib"])
    return prefix / own.relative_to(sys.prefix)


def _valid_for(pyc: Path, source: os.stat_result) -> bool:
    """A timestamp-checked .pyc of this interpreter for a source of this mtime and size."""
    try:
        with pyc.open("rb") as handle:
            header = handle.read(16)
    except OSError:
        return False
    if len(header) < 16 or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags, mtime, size = struct.unpack("<III", header[4:16])
    return flags == 0 and mtime == int(source.st_mtime) & 0xFFFFFFFF and size == source.st_size & 0xFFFFFFFF


def share(target: Path, donors: list[Path]) -> tuple[int, int]:
    """Link the donors' .pyc files for the sources `target` shares with them; returns (linked, sources)."""
    donor_roots = [d for d in (_site_packages(p) for p in donors) if d.is_dir()]
    linked = sources = 0
    for folder, dirs, files in os.walk(target):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(folder).relative_to(target)
        for name in files:
            if not name.endswith(".py"):
                continue
            sources += 1
            source = Path(folder) / name
            try:
                stat = source.stat()
            except OSError:
                continue
            own = Path(importlib.util.cache_from_source(str(source)))
            if _valid_for(own, stat):
                continue
            for root in donor_roots:
                candidate = root / rel / name
                try:
                    if not os.path.samestat(stat, candidate.stat()):
                        continue
                except OSError:
                    continue
                pyc = Path(importlib.util.cache_from_source(str(candidate)))
                if not _valid_for(pyc, stat):
                    continue
                own.parent.mkdir(exist_ok=True)
                try:
                    os.link(pyc, own)
                except FileExistsError:
                    pass
                except OSError:
                    shutil.copy2(pyc, own)
                linked += 1
                break
    return linked, sources


def main(argv: list[str]) -> int:
    venv = Path(argv[0]).resolve()
    target = _site_packages(venv)
    if not target.is_dir():
        print(f"bytecode: no {target.name} folder in {venv.name}: nothing to compile")
        return 0
    donors = [Path(p).resolve() for p in argv[1:] if (Path(p) / ".ftpipe-lock").is_file() and Path(p).resolve() != venv]
    linked, sources = share(target, donors)
    # The rest, as `uv pip install --compile-bytecode` would (valid .pyc files, linked or not, are skipped;
    # sources that do not compile, such as test data in some packages, are left alone like uv does).
    compileall.compile_dir(str(target), quiet=2, workers=0, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    print(f"bytecode: {linked} of {sources} .pyc files linked from {', '.join(p.name for p in donors) or 'no other environment'}, the rest compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
