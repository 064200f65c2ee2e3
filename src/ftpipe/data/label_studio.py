"""Label Studio: turn exported tasks into chat rows, and export a project over its API.

Part of `preprocess-sft`. A JSON export is a list of tasks `{id, data, annotations[]}`; each
annotation has `result[]` items, and the generative-supervised ("supervised LLM fine-tuning")
template stores the prompt in `data.prompt` and the answer in a `textarea` result
(`value.text`). Cancelled (skipped) annotations are ignored; of the rest, the ground-truth one
(or the latest, by `data.label_studio.annotation`) is used.

A project is exported with the official `label-studio-sdk` (`GET /api/projects/<id>/export`).
A legacy token is sent as `Token <key>`; a personal access token (a JWT refresh token) is first
exchanged at `/api/token/refresh/` for a short-lived access token by the SDK. The token is never
logged: it is registered with ftpipe's redaction (`ftpipe.core.secrets`). preprocess-sft's `check`
validates the settings with `api_token` (no connection: the project is a remote input, `project_url`);
its `plan` downloads the export with `export_project`.

    ftpipe preprocess-sft --config config.yaml --format label_studio_api
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ftpipe.core.errors import ConfigError, InputError
from ftpipe.core.fsutil import sha256_file
from ftpipe.core.secrets import register_secret
from ftpipe.data.formats import RowError

log = logging.getLogger(__name__)

TOKEN_ENV = "LABEL_STUDIO_API_KEY"


def is_export(record: Any) -> bool:
    """True when a JSON array element looks like a Label Studio task."""
    return isinstance(record, dict) and isinstance(record.get("data"), dict) and (
        "annotations" in record or "predictions" in record or "id" in record
    )


def _when(annotation: dict) -> tuple:
    ident = annotation.get("id")
    ident = ident if isinstance(ident, (int, float)) and not isinstance(ident, bool) else 0  # comparable
    return (str(annotation.get("updated_at") or annotation.get("created_at") or ""), ident)


def choose_annotation(annotations: list[dict], prefer: str) -> tuple[int, dict] | None:
    """(index, annotation) to use: not cancelled; ground truth first when `prefer` says so; latest."""
    usable = [(i, a) for i, a in enumerate(annotations) if isinstance(a, dict) and not a.get("was_cancelled")]
    if not usable:
        return None
    if prefer == "ground_truth":
        truth = [(i, a) for i, a in usable if a.get("ground_truth")]
        usable = truth or usable
    return max(usable, key=lambda item: _when(item[1]))


def normalise_task(task: Any, cfg) -> dict:
    """One exported task -> `{"messages": [user prompt, assistant answer]}`.

    Args:
        task: one element of the export.
        cfg: `data.label_studio` (prompt_field, answer_from_name, annotation).

    Raises:
        RowError: no usable annotation (reason `no_annotation`), or a missing prompt / answer.
    """
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise RowError("data", "missing: not a Label Studio task")
    data = task["data"]
    prompt = data.get(cfg.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(f"data.{cfg.prompt_field}", "missing" if prompt is None else "expected a non-empty string")
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise RowError("annotations", "expected a list")
    chosen = choose_annotation(annotations, cfg.annotation)
    if chosen is None:
        what = f"all {len(annotations)} annotations cancelled" if annotations else "no annotations"
        raise RowError("annotations", what, reason="no_annotation")
    index, annotation = chosen
    texts = []
    result = annotation.get("result") or []
    for item in result if isinstance(result, list) else []:
        if not isinstance(item, dict) or item.get("type") != "textarea":
            continue
        if cfg.answer_from_name and item.get("from_name") != cfg.answer_from_name:
            continue
        value = item.get("value")
        text = value.get("text") if isinstance(value, dict) else None
        texts.extend([text] if isinstance(text, str) else [t for t in text if isinstance(t, str)] if isinstance(text, list) else [])
        if not cfg.answer_from_name:
            break  # the first textarea is the answer
    answer = "\n".join(texts)
    if not answer.strip():
        wanted = f"from_name {cfg.answer_from_name!r}" if cfg.answer_from_name else "any textarea"
        raise RowError(f"annotations[{index}].result", f"no textarea answer ({wanted})")
    messages = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        messages.append({"role": "system", "content": data["system"]})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def _is_jwt(token: str) -> bool:
    """True for a personal access token (a JWT), False for a legacy token (40 hex characters)."""
    import jwt

    try:
        jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return False
    return True


def _rejected(where: str, status: int, detail: str | None, token: str, source: str) -> InputError:
    """The one-line error for a 401 / 403, by what the server said (Label Studio 1.23's wording)."""
    said = f"{status}: {detail}" if detail else str(status)
    settings = "Organization > API Token Settings"
    if detail and "legacy token authentication has been disabled" in detail:
        return InputError(f"{where}: legacy tokens are disabled for this organization",
                          hint=f"use a personal access token, or enable Legacy Tokens in {settings}")
    if detail == "Authentication credentials were not provided." and _is_jwt(token):
        # The server ignores a Bearer access token when its organization has personal access tokens off.
        return InputError(f"{where}: personal access tokens are disabled for this organization",
                          hint=f"use a legacy token, or enable Personal Access Tokens in {settings}")
    return InputError(f"{where}: the token in {source} was rejected ({said})",
                      hint=f"create a new access token in Label Studio (Account & Settings) and set {source}")


def api_token(cfg) -> tuple[str, str]:
    """The token to send and where it was set, once url and project_id are checked: everything about a
    project export that can be checked without a connection (preprocess-sft's `check`).

    Args:
        cfg: `data.label_studio` (url, project_id, token).

    Returns:
        (token, its source: LABEL_STUDIO_API_KEY or data.label_studio.token).

    Raises:
        ConfigError: url, project_id or token missing.
    """
    if not cfg.url:
        raise ConfigError("data.label_studio.url: required for format label_studio_api", hint="--set data.label_studio.url=http://HOST:8080")
    if cfg.project_id is None:
        raise ConfigError("data.label_studio.project_id: required for format label_studio_api", hint="--set data.label_studio.project_id=ID")
    # Environment beats YAML (the config order); the environment is the recommended place.
    token, source = os.environ.get(TOKEN_ENV), TOKEN_ENV
    if not token and cfg.token is not None:
        token, source = cfg.token.get_secret_value(), "data.label_studio.token"
    if not token:
        raise ConfigError(f"data.label_studio.token: not set (and no {TOKEN_ENV} in the environment)", hint=f"export {TOKEN_ENV}=<your token>")
    return token, source


def project_url(cfg) -> str:
    """The project's address in Label Studio (what a manifest records as the remote input)."""
    return f"{cfg.url.rstrip('/')}/projects/{cfg.project_id}"


def export_project(cfg, dest: Path) -> dict:
    """Download a project's JSON export to `dest` with label-studio-sdk.

    `GET /api/projects/<id>/export` returns every annotated task in one body (it does not page);
    tasks without annotations are not exported, skipped ones are (and dropped as `no_annotation`).

    Args:
        cfg: `data.label_studio` (url, project_id, token).
        dest: file to write (the caller passes it to the stage as its input).

    Returns:
        {"url", "project_id", "title", "sha256"} (no token).

    Raises:
        ConfigError: url, project_id or token missing.
        InputError: server unreachable or not Label Studio, token rejected, project not found.
    """
    token, source = api_token(cfg)
    register_secret(token)

    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    base = cfg.url.rstrip("/") + "/"
    where = f"Label Studio at {cfg.url}"
    log.info("exporting project %s from %s", cfg.project_id, cfg.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        # A personal access token is exchanged for an access token here (POST /api/token/refresh/);
        # an expired one is refused by the SDK before it is sent.
        client = LabelStudio(base_url=base, api_key=token, timeout=120)
        project = client.projects.get(id=cfg.project_id)
        with open(tmp, "wb") as fh:
            for chunk in client.projects.exports.download_sync(cfg.project_id, export_type="JSON"):
                fh.write(chunk)
        os.replace(tmp, dest)
    except ApiError as exc:
        status = exc.status_code
        detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
        if status in (401, 403):
            raise _rejected(where, status, detail, token, source) from None
        if status == 404:
            raise InputError(f"{where}: project {cfg.project_id} not found (404)", hint="check data.label_studio.project_id") from None
        raise InputError(f"{where}: export failed with HTTP {status}{': ' + str(detail) if detail else ''}") from None
    except httpx.HTTPError as exc:
        raise InputError(f"{where}: cannot connect ({type(exc).__name__}: {exc})", hint="check data.label_studio.url and that the server runs") from None
    except json.JSONDecodeError:
        # the SDK parses error bodies as JSON: an HTML page means something else answered (a proxy, a login page)
        raise InputError(f"{where}: the answer was not JSON (is a proxy or login page in front of Label Studio?)",
                         hint="check data.label_studio.url (the Label Studio base URL, without /api)") from None
    finally:
        tmp.unlink(missing_ok=True)
    title = getattr(project, "title", None)
    log.info("exported project %s (%s) -> %s", cfg.project_id, title, dest.name)
    return {"url": cfg.url, "project_id": cfg.project_id, "title": title, "sha256": sha256_file(dest)}
