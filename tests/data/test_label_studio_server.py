"""`preprocess-sft --format label_studio_api` against a real Label Studio server.

Slow tier. One `label-studio start` from `.venv-labelstudio` (PyPI `label-studio`, pinned in
requirements/labelstudio.lock) serves the whole module on 127.0.0.1:<free port>, with SQLite in a
temp folder (a copy of the database that bootstrap migrated once: ~4 s to start instead of ~30 s).
The user and its legacy token are made by `label-studio start --username --password --user-token`;
the project (the shipped "Supervised Language Model Fine-tuning" template), tasks, annotations
and personal access tokens through the server's API.
Then the CLI pulls the project with a personal access token (refresh -> access JWT) and with a
legacy token; rotated, expired, wrong and org-disabled tokens each end in one `error:` line.

    bash scripts/bootstrap.sh labelstudio
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/data/test_label_studio_server.py

Paging: `GET /api/projects/<id>/export` (what label-studio-sdk's `exports.download_sync` calls) does
not page; it returns every annotated task in one body. The task list API does page (100 a page by
default), so the project holds more annotated tasks than one page and the test checks none is lost.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

VENV = REPO / ".venv-labelstudio"
EMAIL, PASSWORD = "annotator@example.com", "not-a-real-password-1"
LEGACY = "ftpipe-test-legacy-token-0123456789abcdef"  # the user's legacy token, set at start
SIGNING_KEY = secrets.token_urlsafe(48)  # the server's Django SECRET_KEY, which signs its JWTs
START_DEADLINE_S = float(os.environ.get("FTPIPE_TEST_LABEL_STUDIO_START_S", "240"))
PAGE = 100  # the task list API's default page size (Label Studio's REST_FRAMEWORK PAGE_SIZE)
BULK = PAGE + 20  # pre-annotated tasks imported in one call: more than one page of the task API


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answer(text: str) -> list[dict]:
    # what the TextArea of the supervised-LLM template stores
    return [{"from_name": "instruction", "to_name": "prompt", "type": "textarea", "value": {"text": [text]}}]


class LabelStudioServer:
    """A running `label-studio start`, and its API through the legacy token."""

    def __init__(self, data_dir: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.data_dir, self.port, self.proc, self.log = data_dir, port, proc, log
        self.url = f"http://127.0.0.1:{port}"
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {LEGACY}"},
                                timeout=60, trust_env=False)  # loopback only, no proxy
        self.pat = ""  # the current personal access token (tests that rotate it update this)
        self.project_id = 0
        self.expected: list[tuple[str, str]] = []  # (prompt, answer) rows preprocess-sft must give

    def call(self, method: str, path: str, body=None, status: int | tuple = (200, 201)) -> dict | list | None:
        response = self.api.request(method, path, json=body)
        wanted = status if isinstance(status, tuple) else (status,)
        assert response.status_code in wanted, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _supervised_llm_config() -> str:
    """The labeling config of the template "Supervised Language Model Fine-tuning", as shipped."""
    found = list(VENV.glob("lib/python*/site-packages/label_studio/annotation_templates/generative-ai/supervised-llm/config.yml"))
    assert len(found) == 1, f"supervised-llm template not found in {VENV}"
    return yaml.safe_load(found[0].read_text(encoding="utf-8"))["config"]


def _populate(server: LabelStudioServer) -> None:
    """Project, tasks and annotations through the API; fills `server.expected`."""
    project = server.call("POST", "/api/projects/", {"title": "SFT answers", "label_config": _supervised_llm_config()})
    pid = server.project_id = project["id"]
    hand = [{"prompt": "Capital of France?"}, {"prompt": "2+2?"}, {"prompt": "Skip me"}, {"prompt": "Not labeled yet"}]
    bulk = [{"data": {"prompt": f"Question {i}?"}, "annotations": [{"result": _answer(f"Answer {i}.")}]} for i in range(BULK)]
    server.call("POST", f"/api/projects/{pid}/import", hand + bulk, status=201)
    tasks = {t["data"]["prompt"]: t["id"] for t in server.call("GET", f"/api/tasks/?project={pid}&page_size={len(hand) + BULK}")["tasks"]}
    assert len(tasks) == len(hand) + BULK
    first_page = server.call("GET", f"/api/tasks/?project={pid}")
    assert len(first_page["tasks"]) == PAGE < first_page["total"], "the task API no longer pages at 100"

    def annotate(prompt: str, **body) -> None:
        server.call("POST", f"/api/tasks/{tasks[prompt]}/annotations/", body, status=201)

    annotate("Capital of France?", result=_answer("Paris"))
    annotate("2+2?", result=_answer("4"), ground_truth=True)
    time.sleep(0.01)  # a later, non-ground-truth annotation: ground truth still wins
    annotate("2+2?", result=_answer("four"))
    annotate("Skip me", result=[], was_cancelled=True)  # skipped in the UI
    server.expected = [("Capital of France?", "Paris"), ("2+2?", "4")] + [(f"Question {i}?", f"Answer {i}.") for i in range(BULK)]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """One Label Studio server for the module; stopped (and waited for) at the end."""
    exe = VENV / "bin" / "label-studio"
    template = VENV / "share/label-studio/migrated.sqlite3"  # made by scripts/post-install-labelstudio.sh
    for path in (exe, template):
        if not path.exists():
            pytest.fail(f"{path.relative_to(REPO)} missing: run `bash scripts/bootstrap.sh labelstudio` (CI builds it)")
    data_dir = tmp_path_factory.mktemp("label-studio")
    shutil.copyfile(template, data_dir / "label_studio.sqlite3")  # migrated once at bootstrap, not per run
    port = _free_port()
    env = {
        "PATH": f"{VENV / 'bin'}:/usr/bin:/bin", "HOME": str(data_dir), "LANG": "C.UTF-8",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite", "SECRET_KEY": SIGNING_KEY,
        # nothing beyond loopback: no PyPI version check, no Sentry, no analytics
        "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false",
    }
    log = data_dir / "server.log"
    argv = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
            "--username", EMAIL, "--password", PASSWORD, "--user-token", LEGACY, "--enable-legacy-api-token"]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=data_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LabelStudioServer(data_dir, port, proc, log)
    try:
        deadline = started + START_DEADLINE_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-studio exited with {proc.returncode} before serving:\n{server.log_text()[-3000:]}")
            try:
                if server.api.get("/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"label-studio not healthy after {START_DEADLINE_S:.0f}s (raise FTPIPE_TEST_LABEL_STUDIO_START_S):\n"
                            f"{server.log_text()[-3000:]}")
            time.sleep(0.3)
        print(f"label-studio started in {time.monotonic() - started:.1f}s")  # shown with -s
        _populate(server)
        server.pat = server.call("POST", "/api/token/", status=201)["token"]
        yield server
    finally:
        server.api.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


def api_config(proj, server: LabelStudioServer, project_id: int | None = None) -> None:
    proj.config(source=None, extra="")
    text = (proj.root / "config.yaml").read_text()
    text = text.replace("data:\n  name: ds\n", f"data:\n  name: ds\n  format: label_studio_api\n  label_studio:\n"
                        f"    url: {server.url}\n    project_id: {project_id or server.project_id}\n")
    (proj.root / "config.yaml").write_text(text + "  val_fraction: 0.0\n")


def secret_free(proj, *secrets: str) -> None:
    for folder in ("logs", "prepared"):
        for path in (proj.root / folder).rglob("*"):
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                assert not any(s in text for s in secrets), path


def requests_since(server: LabelStudioServer, offset: int) -> list[str]:
    """Request lines ("POST /api/token/refresh/ HTTP/1.1" 200) the server logged after `offset`."""
    return [line.split('"')[1] + " " + line.rsplit('"', 1)[1].split()[0]
            for line in server.log_text()[offset:].splitlines() if "django.server" in line and '"' in line]


def one_error_line(result) -> str:
    """The run failed with exit 2 and said so on exactly one stderr line."""
    assert result.code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not [line for line in lines if line not in errors and "Label Studio at" in line], result.stderr
    return errors[0]


def test_personal_access_token_refresh_then_export(proj, label_studio) -> None:
    server = label_studio
    api_config(proj, server)
    offset = len(server.log_text())
    result = proj.cli(env={"LABEL_STUDIO_API_KEY": server.pat})
    assert result.code == 0, result.output
    seen = requests_since(server, offset)
    assert seen[0] == "POST /api/token/refresh/ HTTP/1.1 200", seen  # the PAT is exchanged first
    assert f"GET /api/projects/{server.project_id}/export?export_type=JSON HTTP/1.1 200" in seen, seen
    rows = proj.out("train")
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == server.expected
    meta = proj.metadata()
    assert meta["format"] == "label_studio"
    dropped = {k: n for k, n in meta["counts"]["dropped"].items() if n}
    assert dropped == {"no_annotation": 1}  # the skipped task; unlabeled ones are not exported
    assert meta["source"]["label_studio"]["title"] == "SFT answers"
    assert server.pat not in result.output
    secret_free(proj, server.pat)


def test_legacy_token_then_exported_again(proj, label_studio) -> None:
    """A project on a server is a remote input: a second run exports it again (never 'up to date')."""
    server = label_studio
    api_config(proj, server)
    offset = len(server.log_text())
    result = proj.cli(env={"LABEL_STUDIO_API_KEY": LEGACY})
    assert result.code == 0, result.output
    assert len(proj.out("train")) == len(server.expected)
    assert not [r for r in requests_since(server, offset) if "/api/token/" in r]
    offset = len(server.log_text())
    again = proj.cli(env={"LABEL_STUDIO_API_KEY": LEGACY})
    assert again.code == 0 and "up to date, skipped" not in again.output, again.output
    assert f"GET /api/projects/{server.project_id}/export?export_type=JSON HTTP/1.1 200" in requests_since(server, offset)
    manifest = json.loads((proj.root / "logs/_prepared/ds/manifest.json").read_text(encoding="utf-8"))
    assert manifest["inputs"]["source"] == {"remote": f"{server.url}/projects/{server.project_id}"}
    assert LEGACY not in result.output + again.output
    secret_free(proj, LEGACY)


def test_rotated_personal_token_is_one_line(proj, label_studio) -> None:
    server = label_studio
    old = server.pat
    server.pat = server.call("POST", "/api/token/rotate/", {"refresh": old})["refresh"]  # "Rotate" in the UI
    api_config(proj, server)
    result = proj.cli(env={"LABEL_STUDIO_API_KEY": old})
    assert one_error_line(result) == (
        f"error: Label Studio at {server.url}: the token in LABEL_STUDIO_API_KEY was rejected "
        "(401: Token is blacklisted) (next: create a new access token in Label Studio "
        "(Account & Settings) and set LABEL_STUDIO_API_KEY)")
    assert old not in result.output
    secret_free(proj, old)


def test_expired_personal_token(proj, label_studio) -> None:
    # A PAT past its expiry, signed with this server's own key (the API cannot issue a short-lived PAT:
    # `api_token_ttl_days` is whole days); the SDK refuses it before sending it.
    server = label_studio
    now = int(time.time())
    expired = jwt.encode({"token_type": "refresh", "exp": now - 60, "iat": now - 3600, "jti": "e" * 32, "user_id": "1"},
                         SIGNING_KEY, algorithm="HS256")
    api_config(proj, server)
    line = one_error_line(proj.cli(env={"LABEL_STUDIO_API_KEY": expired}))
    assert "the token in LABEL_STUDIO_API_KEY was rejected (401: API key has expired. Please obtain a new refresh token.)" in line
    assert expired not in line
    secret_free(proj, expired)


def test_wrong_token_in_config_names_the_key(proj, label_studio) -> None:
    server = label_studio
    api_config(proj, server)
    text = (proj.root / "config.yaml").read_text().replace("    project_id:", "    token: not-the-token-0123\n    project_id:")
    (proj.root / "config.yaml").write_text(text)
    line = one_error_line(proj.cli(env={"LABEL_STUDIO_API_KEY": ""}))
    assert line == (f"error: Label Studio at {server.url}: the token in data.label_studio.token was rejected "
                    "(401: Invalid token.) (next: create a new access token in Label Studio (Account & Settings) "
                    "and set data.label_studio.token)")


@pytest.mark.parametrize("setting, token, expected", [
    ("legacy_api_tokens_enabled", "legacy",
     "legacy tokens are disabled for this organization (next: use a personal access token, or enable Legacy Tokens "
     "in Organization > API Token Settings)"),
    ("api_tokens_enabled", "pat",
     "personal access tokens are disabled for this organization (next: use a legacy token, or enable Personal Access "
     "Tokens in Organization > API Token Settings)"),
])
def test_token_kind_disabled_in_the_organization(proj, label_studio, setting, token, expected) -> None:
    server = label_studio
    key = LEGACY if token == "legacy" else server.pat
    api_config(proj, server)
    if setting == "legacy_api_tokens_enabled":  # switched off with the PAT (the legacy token stops working)
        admin = httpx.Client(base_url=server.url, trust_env=False, timeout=60)
        pat_access = admin.post("/api/token/refresh/", json={"refresh": server.pat}).json()["access"]
        admin.headers["Authorization"] = f"Bearer {pat_access}"
    else:
        admin = server.api
    settings = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": True}
    try:
        assert admin.post("/api/jwt/settings", json={**settings, setting: False}).status_code == 200
        line = one_error_line(proj.cli(env={"LABEL_STUDIO_API_KEY": key}))
        assert line.endswith(expected), line
        assert key not in line
    finally:
        assert admin.post("/api/jwt/settings", json=settings).status_code == 200
        if admin is not server.api:
            admin.close()


def test_project_not_found(proj, label_studio) -> None:
    server = label_studio
    api_config(proj, server, project_id=9999)
    line = one_error_line(proj.cli(env={"LABEL_STUDIO_API_KEY": LEGACY}))
    assert line == f"error: Label Studio at {server.url}: project 9999 not found (404) (next: check data.label_studio.project_id)"
