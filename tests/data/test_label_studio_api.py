"""The Label Studio API path where a real server cannot serve: what sits in front of it, or no server.

The real server covers the rest (tests/data/test_label_studio_server.py: personal access and legacy
tokens, rotated / expired / wrong / disabled tokens, a missing project, paging). A real Label Studio
cannot be made to answer with a reverse proxy's HTML error page or a 500 in the middle of an
export, so a small fake on 127.0.0.1 does that here.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import jwt
import pytest

from ftpipe.core.errors import InputError
from loopback import LoopbackServer

LEGACY = "0123456789abcdef0123456789abcdef01234567"
HTML = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


class Proxy(LoopbackServer):
    """Answers `routes[(method, path)] = (status, body)`; anything else is a proxy's HTML 502.
    Records (method, path, Authorization) of every request."""

    def __init__(self, routes: dict) -> None:
        self.requests: list[tuple] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _answer(self):
                path = self.path.split("?")[0]
                fake.requests.append((self.command, path, self.headers.get("Authorization")))
                status, body = routes.get((self.command, path), (502, HTML))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if isinstance(body, bytes) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer  # noqa: N815 - http.server API

        super().__init__(Handler)


def api_config(proj, url, token: str | None = None):
    proj.config(source=None, extra="")
    text = (proj.root / "config.yaml").read_text()
    token_line = f"    token: {token}\n" if token else ""
    text = text.replace("data:\n  name: ds\n", f"data:\n  name: ds\n  format: label_studio_api\n"
                        f"  label_studio:\n    url: {url}\n    project_id: 7\n{token_line}")
    (proj.root / "config.yaml").write_text(text + "  val_fraction: 0.0\n")


def personal_token() -> str:
    now = int(time.time())
    return jwt.encode({"token_type": "refresh", "exp": now + 3600, "iat": now, "jti": "a" * 32, "user_id": "1"},
                      "a-signing-key-the-proxy-never-checks-0123", algorithm="HS256")


def test_html_page_instead_of_the_api(proj, monkeypatch):
    """A proxy (or a login page) answers the token refresh with HTML: one line, not a JSON traceback."""
    with Proxy({}) as server:
        api_config(proj, server.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", personal_token())
        with pytest.raises(InputError) as info:
            proj.stage()
        assert server.requests[0][:2] == ("POST", "/api/token/refresh/")
    assert info.value.message == (
        f"Label Studio at {server.url}: the answer was not JSON (is a proxy or login page in front of Label Studio?)")
    assert not list((proj.root / "logs").rglob("*.part"))


def test_server_error_during_export(proj, monkeypatch):
    routes = {("GET", "/api/projects/7/"): (200, {"id": 7, "title": "p"}),
              ("GET", "/api/projects/7/export"): (500, HTML)}
    with Proxy(routes) as server:
        api_config(proj, server.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
        with pytest.raises(InputError) as info:
            proj.stage()
    assert info.value.message == f"Label Studio at {server.url}: export failed with HTTP 500"
    assert not list((proj.root / "logs").rglob("*.part"))


def test_environment_token_beats_the_config_file(proj, monkeypatch):
    with Proxy({}) as server:
        api_config(proj, server.url, token="token-from-config-file")
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
        with pytest.raises(InputError):
            proj.stage()
    assert server.requests[0][2] == f"Token {LEGACY}"


def test_unreachable_server(proj, monkeypatch):
    api_config(proj, "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
    with pytest.raises(InputError) as info:
        proj.stage()
    assert info.value.message.startswith("Label Studio at http://127.0.0.1:9: cannot connect (ConnectError: ")


def test_project_is_a_remote_input_exported_by_the_plan(proj, monkeypatch):
    """check opens no connection and writes nothing (the project is a `Remote` input, its URL); the
    export happens when the stage runs, and every run exports again (a remote input is never up to date)."""
    from ftpipe.config import load_config
    from ftpipe.core.manifest import Remote
    from ftpipe.stages import get, prepare

    task = {"id": 1, "data": {"prompt": "Say hi"}, "annotations": [
        {"id": 1, "result": [{"type": "textarea", "value": {"text": ["hi"]}}]}]}
    routes = {("GET", "/api/projects/7/"): (200, {"id": 7, "title": "greetings"}),
              ("GET", "/api/projects/7/export"): (200, [task])}
    with Proxy(routes) as server:
        api_config(proj, server.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
        _, inputs = prepare(get("preprocess-sft"), load_config(proj.root / "config.yaml", [], environ={}))
        assert inputs["source"] == Remote(f"{server.url}/projects/7")
        assert server.requests == [] and not (proj.root / "logs").exists()
        first = proj.stage(force=False)
        again = proj.stage(force=False)
        exports = [r for r in server.requests if r[1] == "/api/projects/7/export"]
    assert not first.skipped and not again.skipped and len(exports) == 2
    assert again.manifest["inputs"]["source"] == {"remote": f"{server.url}/projects/7"}
    assert (proj.root / "logs/_prepared/ds/label_studio_project_7.json").is_file()
    meta = proj.metadata()
    assert meta["source"]["path"] == "logs/_prepared/ds/label_studio_project_7.json"
    assert meta["source"]["label_studio"] == {"url": server.url, "project_id": 7, "title": "greetings",
                                              "sha256": meta["source"]["sha256"]}
    assert proj.out("train") == [{"messages": [{"role": "user", "content": "Say hi"},
                                               {"role": "assistant", "content": "hi"}]}]
