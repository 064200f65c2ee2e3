"""The Label Studio API path (label-studio-sdk) against a faithful local fake on 127.0.0.1.

No Label Studio server runs here (PyPI `label-studio` is a full Django app with its own database);
the fake in conftest.py implements the documented endpoints the SDK calls: token refresh,
project, and JSON export.
"""

from __future__ import annotations

import pytest

from ftpipe.core.errors import InputError

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def task(tid, prompt, answer, cancelled=False):
    return {"id": tid, "data": {"prompt": prompt}, "annotations": [{
        "id": tid, "was_cancelled": cancelled, "ground_truth": False, "created_at": "2026-01-01T00:00:00Z",
        "result": [{"from_name": "answer", "to_name": "prompt", "type": "textarea", "value": {"text": [answer]}}]}]}


TASKS = [task(1, "Capital of France?", "Paris"), task(2, "2+2?", "4"), task(3, "Skip me", "x", cancelled=True)]


def api_config(proj, url, project_id=7):
    proj.config(source=None, extra="")
    text = (proj.root / "config.yaml").read_text()
    text = text.replace("data:\n  name: ds\n", f"data:\n  name: ds\n  format: label_studio_api\n"
                        f"  label_studio:\n    url: {url}\n    project_id: {project_id}\n")
    (proj.root / "config.yaml").write_text(text + "  val_fraction: 0.0\n")


def secret_free(proj, secret):
    for folder in ("logs", "prepared"):
        for path in (proj.root / folder).rglob("*"):
            if path.is_file():
                assert secret not in path.read_text(encoding="utf-8", errors="replace"), path


def test_legacy_token_export_then_skip(proj, fake_label_studio):
    personal = "unused"
    with fake_label_studio({7: ("SFT project", TASKS)}, LEGACY, personal) as server:
        api_config(proj, server.url)
        result = proj.cli(env={"LABEL_STUDIO_API_KEY": LEGACY})
        assert result.code == 0, result.output
        rows = proj.out("train")
        assert [r["messages"][1]["content"] for r in rows] == ["Paris", "4"]
        meta = proj.metadata()
        assert meta["format"] == "label_studio" and meta["counts"]["dropped"]["no_annotation"] == 1
        assert meta["source"]["label_studio"]["project_id"] == 7
        assert meta["source"]["label_studio"]["title"] == "SFT project"
        gets = [(r["path"], r["authorization"]) for r in server.requests]
        assert ("/api/projects/7/", f"Token {LEGACY}") in gets
        export = next(r for r in server.requests if r["path"] == "/api/projects/7/export")
        assert export["query"].get("export_type") == ["JSON"]
        assert not any(r["path"] == "/api/token/refresh/" for r in server.requests)
        again = proj.cli(env={"LABEL_STUDIO_API_KEY": LEGACY})
        assert again.code == 0 and "up to date, skipped" in again.output
        assert LEGACY not in result.output + again.output
    secret_free(proj, LEGACY)


def test_personal_access_token_is_exchanged_and_never_logged(proj, fake_label_studio, make_jwt):
    personal = make_jwt("refresh")
    with fake_label_studio({7: ("p", TASKS)}, LEGACY, personal) as server:
        api_config(proj, server.url)
        result = proj.cli(env={"LABEL_STUDIO_API_KEY": personal})
        assert result.code == 0, result.output
        refresh = [r for r in server.requests if r["path"] == "/api/token/refresh/"]
        assert len(refresh) == 1 and refresh[0]["method"] == "POST"
        export = next(r for r in server.requests if r["path"] == "/api/projects/7/export")
        assert export["authorization"].startswith("Bearer ") and personal not in export["authorization"]
        assert export["authorization"].split(" ", 1)[1] in server.access_tokens
        assert len(proj.out("train")) == 2
        assert personal not in result.output
    secret_free(proj, personal)


@pytest.mark.parametrize("token, project_id, expected", [
    ("wrong-legacy-token-123", 7, "the token was rejected (401: Invalid token.)"),
    (LEGACY, 99, "project 99 not found (404)"),
])
def test_api_errors_are_one_line(proj, fake_label_studio, monkeypatch, token, project_id, expected):
    with fake_label_studio({7: ("p", TASKS)}, LEGACY, "unused") as server:
        api_config(proj, server.url, project_id)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
        with pytest.raises(InputError) as info:
            proj.stage()
        assert info.value.message == f"Label Studio at {server.url}: {expected}"


def test_expired_personal_token(proj, fake_label_studio, monkeypatch, make_jwt):
    with fake_label_studio({7: ("p", TASKS)}, LEGACY, "unused") as server:
        api_config(proj, server.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", make_jwt("refresh", lifetime=-60))
        with pytest.raises(InputError) as info:
            proj.stage()
        assert info.value.message == (
            f"Label Studio at {server.url}: the token was rejected (401: API key has expired. Please obtain a new refresh token.)")


def test_unreachable_server(proj, monkeypatch):
    api_config(proj, "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", LEGACY)
    with pytest.raises(InputError) as info:
        proj.stage()
    assert info.value.message.startswith("Label Studio at http://127.0.0.1:9: cannot connect (ConnectError: ")
