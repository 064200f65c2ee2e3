"""scripts/bootstrap.sh: uv sees pip's indexes, background builds, and the lean llama.cpp compile.

The real installs run in `bash scripts/test.sh` itself (it builds every environment with this script
before the suite starts). Here the background orchestration runs for real against a stand-in `uv`
(a shell script that makes the venv folder and sleeps), so no index is reached.
"""

from __future__ import annotations

import hashlib
import os
import importlib.util
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from ftpipe.core.executor import Environment, wait_for_build
from ftpipe.core.runtime_info import environment_state

spec = importlib.util.spec_from_file_location("pip_config_to_uv", REPO / "scripts/pip_config_to_uv.py")
pip_config_to_uv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pip_config_to_uv)


def test_uv_gets_the_indexes_pip_is_configured_with() -> None:
    listing = "\n".join([
        ":env:.find-links='/wheels/env'",
        "global.find-links='/wheels/file'",
        "global.extra-index-url='file:///mirror/a/simple file:///mirror/b/simple'",
        "install.index-url='https://proxy.example/simple'",
        "global.index-url='https://ignored.example/simple'",
        "global.constraint='/etc/pip/constraints.txt'",
        "global.cert='/etc/ssl/private-ca.pem'",
        "global.timeout='60'",
    ])
    assert pip_config_to_uv.translate(listing) == [
        "--index-url", "https://proxy.example/simple",
        "--extra-index-url", "file:///mirror/a/simple", "--extra-index-url", "file:///mirror/b/simple",
        "--find-links", "/wheels/env",
        "--constraint", "/etc/pip/constraints.txt",
        "--cert=/etc/ssl/private-ca.pem",
    ]
    assert pip_config_to_uv.translate("") == []
    assert pip_config_to_uv.translate("global.no-index='true'") == ["--no-index"]


def test_the_lean_llama_cpp_build_is_keyed_to_its_cmake_file() -> None:
    """gguf.lock's config-settings line names the CMake file it includes by path and by sha256: the
    hash keys uv's cache of the compiled wheel, so editing the file without the lock fails here."""
    line = next(l for l in (REPO / "requirements/gguf.lock").read_text().splitlines() if l.startswith("# config-settings: "))
    package, _, setting = line.removeprefix("# config-settings: ").partition(":")
    assert package == "llama-cpp-python" and setting.startswith("cmake.args=")
    args = setting.removeprefix("cmake.args=").split(";")
    assert "-DLLAVA_BUILD=OFF" in args
    include = next(a for a in args if a.startswith("-DCMAKE_PROJECT_llama.cpp_INCLUDE=")).split("=", 1)[1]
    path = REPO / include.removeprefix("@REPO@/")
    assert include.startswith("@REPO@/") and path.is_file()
    assert "set(LLAMA_BUILD_COMMON OFF" in path.read_text()
    assert "set(GGML_NATIVE OFF" in path.read_text()  # portable: uv's cache is shared by machines that differ
    digest = next(a for a in args if a.startswith("-DFTPIPE_LEAN_CMAKE_SHA256=")).split("=", 1)[1]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def fake_checkout(tmp_path: Path) -> Path:
    """A checkout with bootstrap.sh, one lock `fake`, and a stand-in uv that sleeps $FAKE_UV_SLEEP."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "requirements").mkdir()
    for name in ("bootstrap.sh", "pip_config_to_uv.py", "share_bytecode.py"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    (root / "requirements/fake.lock").write_text("# no packages\n")
    version = re.search(r"^UV_VERSION=(\S+)$", (REPO / "scripts/bootstrap.sh").read_text(), re.M).group(1)
    (root / ".uv/bin").mkdir(parents=True)
    (root / ".uv/bin/python").symlink_to(sys.executable)
    uv = root / ".uv/bin/uv"
    uv.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) echo "uv {version}" ;;\n'
        '  venv) for a; do d=$a; done; mkdir -p "$d/bin"\n'
        f'     printf \'#!/bin/sh\\nexec {sys.executable} "$@"\\n\' > "$d/bin/python"; chmod +x "$d/bin/python" ;;\n'
        '  pip) sleep "${FAKE_UV_SLEEP:-0}" ;;\n'
        "esac\n"
    )
    uv.chmod(0o755)
    return root


def test_background_build_marks_logs_and_is_waited_for(tmp_path: Path, monkeypatch) -> None:
    root = fake_checkout(tmp_path)
    env = Environment("fake", ".venv-fake", "fake", "fake")
    monkeypatch.setenv("FTPIPE_VENV_ROOT", str(root))
    started = time.monotonic()
    out = subprocess.run(["bash", "scripts/bootstrap.sh", "--background", "fake"], cwd=root, env={"FAKE_UV_SLEEP": "2", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 2.5  # returned while the build still runs
    match = re.fullmatch(r"bootstrap: building \.venv-fake in the background \(pid (\d+), log: logs/bootstrap/fake\.log\)\n", out.stdout)
    assert match, out.stdout
    assert environment_state(root, env) == f"building (bootstrap.sh, pid {match[1]})"
    again = subprocess.run(["bash", "scripts/bootstrap.sh", "--background", "fake"], cwd=root, capture_output=True, text=True, timeout=60)
    assert again.stdout == f"bootstrap: .venv-fake is already being built (pid {match[1]})\n"
    assert wait_for_build(root, env, poll_s=0.2) > 0.5  # blocks until the build is done
    log = (root / "logs/bootstrap/fake.log").read_text()
    assert "bootstrap: building .venv-fake from requirements/fake.lock" in log
    assert re.search(r"bootstrap: \.venv-fake built in \d+ s", log), log
    assert (root / ".venv-fake/.ftpipe-lock").read_text().strip() == hashlib.sha256(b"# no packages\n").hexdigest()
    assert not (root / ".venv-fake/.ftpipe-building").exists()
    done = subprocess.run(["bash", "scripts/bootstrap.sh", "--background", "fake"], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout == "bootstrap: .venv-fake up to date\n"


def test_a_foreground_bootstrap_waits_for_a_background_build(tmp_path: Path) -> None:
    """`bootstrap.sh gguf` (or test.sh) while demo.sh's background build of it runs: it waits for
    that build instead of deleting the venv under it, and then finds it up to date."""
    root = fake_checkout(tmp_path)
    env = {"FAKE_UV_SLEEP": "1", "PATH": "/usr/bin:/bin"}
    started = subprocess.run(["bash", "scripts/bootstrap.sh", "--background", "fake"], cwd=root, env=env,
                             capture_output=True, text=True, timeout=60)
    pid = re.search(r"\(pid (\d+),", started.stdout)[1]
    out = subprocess.run(["bash", "scripts/bootstrap.sh", "fake"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"bootstrap: .venv-fake is being built by pid {pid} (logs/bootstrap/fake.log); waiting for it\n"
                          "bootstrap: .venv-fake up to date\n")
    assert "built in" in (root / "logs/bootstrap/fake.log").read_text()


def test_bytecode_is_linked_from_finished_environments_and_compiled_for_the_rest(tmp_path: Path) -> None:
    """scripts/share_bytecode.py: a source that is the same file (uv links one inode into every venv)
    gets the finished donor's .pyc by hard link; a different source, or one only an unfinished venv
    has, is compiled; the interpreter accepts both (no recompile: the .pyc files stay as written)."""
    import sysconfig

    rel = Path(sysconfig.get_paths()["purelib"]).relative_to(sys.prefix)
    venvs = {name: tmp_path / name for name in ("donor", "unfinished", "new")}
    for venv in venvs.values():
        (venv / rel / "pkg").mkdir(parents=True)
    shared = venvs["donor"] / rel / "pkg/shared.py"
    shared.write_text("VALUE = 'shared'\n")
    os.link(shared, venvs["new"] / rel / "pkg/shared.py")
    os.link(shared, venvs["unfinished"] / rel / "pkg/shared.py")
    (venvs["donor"] / rel / "pkg/own.py").write_text("VALUE = 'donor'\n")
    (venvs["new"] / rel / "pkg/own.py").write_text("VALUE = 'new'\n")
    for name in ("unfinished", "donor"):  # the unfinished one's .pyc is as valid, but its build may still be under way
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(venvs[name] / rel)], check=True)
    (venvs["donor"] / ".ftpipe-lock").write_text("x\n")
    script = REPO / "scripts/share_bytecode.py"
    out = subprocess.run([sys.executable, str(script), str(venvs["new"]), str(venvs["unfinished"]), str(venvs["donor"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "bytecode: 1 of 2 .pyc files linked from donor, the rest compiled\n"
    pyc = {name: Path(importlib.util.cache_from_source(str(venvs[name] / rel / "pkg" / f"{mod}.py")))
           for name, mod in (("donor", "shared"), ("new", "shared"))}
    assert os.path.samefile(pyc["donor"], pyc["new"])
    own = Path(importlib.util.cache_from_source(str(venvs["new"] / rel / "pkg/own.py")))
    assert own.is_file() and not os.path.samefile(own, importlib.util.cache_from_source(str(venvs["donor"] / rel / "pkg/own.py")))
    before = {p: p.stat().st_mtime_ns for p in (pyc["new"], own)}
    loaded = subprocess.run([sys.executable, "-c", "import pkg.shared, pkg.own; print(pkg.shared.VALUE, pkg.own.VALUE, pkg.shared.__file__)"],
                            env={"PYTHONPATH": str(venvs["new"] / rel), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.split()[:2] == ["shared", "new"], loaded.stderr
    assert loaded.stdout.split()[2] == str(venvs["new"] / rel / "pkg/shared.py")  # the code names its own path
    assert {p: p.stat().st_mtime_ns for p in (pyc["new"], own)} == before
