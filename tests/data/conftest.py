"""Fixtures for the preprocess-sft tests: a project folder on the tiny model, file writers, CLI."""

from __future__ import annotations

import json
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

import jwt
from conftest import run_cli
from loopback import LoopbackServer


class Proj:
    """A throwaway project: config.yaml (tiny model, data/in.jsonl) and helpers."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.model = model
        (root / "data").mkdir()
        self.config(name="ds", source="data/in.jsonl")

    def config(self, name: str = "ds", source: str | None = "data/in.jsonl", extra: str = "", max_length: int = 256) -> Path:
        text = f"model:\n  path: {self.model}\ndata:\n  name: {name}\n"
        if source:
            text += f"  source: {source}\n"
        text += f"preprocess:\n  max_length: {max_length}\n{extra}"
        path = self.root / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / "data" / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def cli(self, *args: str, env: dict | None = None):
        return run_cli("preprocess-sft", "--config", str(self.root / "config.yaml"), *args,
                       cwd=self.root, env={"FTPIPE_ENV": "train", **(env or {})}, timeout=300)

    def stage(self, *sets: str, force: bool = True, **options):
        """Run the stage in-process (fast: transformers stays imported between tests)."""
        from ftpipe.config import load_config
        from ftpipe.stages import run_stage

        loaded = load_config(self.root / "config.yaml", list(sets), environ={})
        return run_stage("preprocess-sft", loaded, force=force, **options)

    def out(self, split: str, name: str = "ds") -> list[dict]:
        path = self.root / "prepared" / name / f"{split}.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def metadata(self, name: str = "ds") -> dict:
        return json.loads((self.root / "prepared" / name / "metadata.json").read_text(encoding="utf-8"))


@pytest.fixture
def proj(tmp_path, tiny_model_dir) -> Proj:
    return Proj(tmp_path, tiny_model_dir)


# ChatML that renders tool definitions and tool calls (as Qwen / Hermes templates do); the tiny
# model's own template has no tool format, so preprocess-sft refuses tool rows under it.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{{ tools | tojson }}</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{%- if m.tool_calls %}<tool_call>{{ m.tool_calls | tojson }}</tool_call>{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture
def tool_proj(tmp_path, tiny_model_dir) -> Proj:
    """A project on a copy of the tiny model whose chat template renders tools."""
    import shutil

    model = tmp_path / "tools-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TOOLS_TEMPLATE, encoding="utf-8")
    root = tmp_path / "project"
    root.mkdir()
    return Proj(root, model)


def chat(user: str, answer: str, system: str | None = None) -> dict:
    """A messages row."""
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# ---------------------------------------------------------------------------------------------
# A faithful local fake of the Label Studio API parts ftpipe uses (no Label Studio server here).
#
# Built from Label Studio's documented API (and what label-studio-sdk sends):
# - `POST /api/token/refresh/` `{"refresh": <personal access token, a JWT>}` -> `{"access": <JWT>}`;
#   an invalid refresh token -> 401 `{"detail": "Token is invalid or expired", "code": "token_not_valid"}`.
# - every other call needs `Authorization: Token <legacy token>` or `Bearer <access token>`;
#   otherwise 401 `{"detail": "Invalid token."}` (legacy) / `{"detail": "Given token not valid ..."}`.
# - `GET /api/projects/<id>/` -> the project object; unknown id -> 404 `{"detail": "Not found."}`.
# - `GET /api/projects/<id>/export?exportType=JSON` (the SDK sends `export_type`) -> the JSON export:
#   a list of tasks `{id, data, annotations: [{id, result, was_cancelled, ground_truth, ...}]}`,
#   as an attachment.
# It records every request (method, path, query, Authorization header) for the tests.

SECRET = "fake-label-studio-signing-key-for-tests-only"


def make_jwt(kind: str, lifetime: float = 3600) -> str:
    """A JWT shaped like Label Studio's (SimpleJWT: token_type, exp, iat, jti, user_id)."""
    now = int(time.time())
    return jwt.encode(
        {"token_type": kind, "exp": now + int(lifetime), "iat": now, "jti": uuid.uuid4().hex, "user_id": 1},
        SECRET, algorithm="HS256",
    )


class FakeLabelStudio(LoopbackServer):
    """Serve projects {id: (title, tasks)} on 127.0.0.1:<free port>."""

    def __init__(self, projects: dict[int, tuple[str, list]], legacy_token: str, personal_token: str) -> None:
        self.projects = projects
        self.legacy_token = legacy_token
        self.personal_token = personal_token
        self.access_tokens: set[str] = set()
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> tuple:
                url = urlparse(self.path)
                fake.requests.append({
                    "method": self.command, "path": url.path, "query": parse_qs(url.query),
                    "authorization": self.headers.get("Authorization"),
                })
                return url.path, parse_qs(url.query)

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization") or ""
                scheme, _, token = auth.partition(" ")
                if scheme == "Token" and token == fake.legacy_token:
                    return True
                if scheme == "Bearer" and token in fake.access_tokens:
                    return True
                detail = "Invalid token." if scheme == "Token" else "Given token not valid for any token type"
                self._send(401, {"detail": detail})
                return False

            def do_POST(self):  # noqa: N802 - http.server API
                path, _ = self._record()
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if path == "/api/token/refresh/":
                    if body.get("refresh") != fake.personal_token:
                        return self._send(401, {"detail": "Token is invalid or expired", "code": "token_not_valid"})
                    access = make_jwt("access", 300)
                    fake.access_tokens.add(access)
                    return self._send(200, {"access": access})
                self._send(404, {"detail": "Not found."})

            def do_GET(self):  # noqa: N802
                path, query = self._record()
                if not self._authorized():
                    return
                parts = [p for p in path.split("/") if p]
                if len(parts) >= 3 and parts[:2] == ["api", "projects"] and parts[2].isdigit():
                    pid = int(parts[2])
                    if pid not in fake.projects:
                        return self._send(404, {"detail": "Not found."})
                    title, tasks = fake.projects[pid]
                    if len(parts) == 3:
                        return self._send(200, {"id": pid, "title": title, "task_number": len(tasks)})
                    if parts[3:] == ["export"]:
                        kind = (query.get("exportType") or query.get("export_type") or ["JSON"])[0]
                        if kind != "JSON":
                            return self._send(400, {"detail": f"unsupported export type {kind}"})
                        return self._send(200, tasks, {"Content-Disposition": f'attachment; filename="project-{pid}.json"'})
                self._send(404, {"detail": "Not found."})

        super().__init__(Handler)


@pytest.fixture
def fake_label_studio():
    """Factory: `with fake_label_studio(projects, legacy, personal) as server:`."""
    return FakeLabelStudio


@pytest.fixture(name="make_jwt")
def make_jwt_fixture():
    """`make_jwt(kind, lifetime)`: a Label-Studio-shaped JWT (personal access / access token)."""
    return make_jwt
