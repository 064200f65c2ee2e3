"""Field mappings: `data.columns`, ShareGPT `data.tags`, and LLaMA-Factory `dataset_info.json` entries.

Part of `preprocess-sft` (ftpipe/data/preprocess_sft.py). `data.columns` renames the keys of every
record (JSON, JSONL; CSV and Parquet columns are renamed by their readers) to ftpipe's field names
before the format is detected; `data.tags` says which keys and speaker names ShareGPT turns use.
`resolve_dataset_info` reads one entry of a LLaMA-Factory `dataset_info.json` (its `file_name`,
`formatting`, `columns` and `tags`, as LLaMA-Factory's data/README.md describes them) into those
settings, so a LLaMA-Factory dataset is used as registered there:

    ftpipe preprocess-sft --set data.dataset_info.file=data/dataset_info.json --set data.dataset_info.entry=identity
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ftpipe.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# LLaMA-Factory `columns` keys -> ftpipe field names (alpaca: prompt/query/response; sharegpt: messages).
LF_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "messages": "conversations",
    "system": "system",
    "tools": "tools",
}
# Entry keys that name data somewhere else than a local file, or data ftpipe does not train on.
LF_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
LF_UNSUPPORTED_COLUMNS = ("images", "videos", "audios", "chosen", "rejected", "kto_tag")
KEY = "data.dataset_info"


def remap(record: Any, columns: dict[str, str]) -> Any:
    """`record` with the keys named by `columns` ({ours: theirs}) renamed to ours (in place; all at
    once, so a mapping may swap names). Non-objects and records without those keys pass unchanged."""
    if not columns or type(record) is not dict:
        return record
    moved = {ours: record.pop(theirs) for ours, theirs in columns.items() if theirs in record}
    record.update(moved)
    return record


def field_in_file(field: str, columns: dict[str, str]) -> str:
    """A row error's field as the file names it: `instruction` -> `question` when data.columns maps it."""
    if not columns:
        return field
    cut = min((i for i in (field.find("["), field.find(".")) if i >= 0), default=len(field))
    root = field[:cut]
    return columns[root] + field[cut:] if root in columns else field


def resolve_dataset_info(data, root: Path) -> tuple[Any, Path | None]:
    """`data` with the settings of its `dataset_info` entry filled in (data.source, format, columns,
    tags; the config's own values win), and the dataset_info.json path (None when not used).

    Raises:
        ConfigError: only one of file/entry set, the file or entry missing or unreadable, an entry that
            names no local file, a preference (ranking) or multimodal dataset.
    """
    info = data.dataset_info
    if not info.file and not info.entry:
        return data, None
    if not info.file or not info.entry:
        missing = "file" if not info.file else "entry"
        raise ConfigError(f"{KEY}.{missing}: not set (both file and entry are needed)",
                          hint=f"--set {KEY}.file=data/dataset_info.json --set {KEY}.entry=NAME")
    path = Path(info.file) if Path(info.file).is_absolute() else root / info.file
    if not path.is_file():
        raise ConfigError(f"{KEY}.file: {info.file} not found", hint=f"check {KEY}.file (relative to {root})")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{info.file}: not a JSON dataset_info file ({exc})", hint=f"fix {info.file}") from None
    if not isinstance(entries, dict):
        raise InputError(f"{info.file}: expected an object of dataset entries", hint=f"fix {info.file}")
    entry = entries.get(info.entry)
    where = f"{info.file}: entry {info.entry!r}"
    if not isinstance(entry, dict):
        names = ", ".join(sorted(entries)[:12]) + (", ..." if len(entries) > 12 else "")
        raise ConfigError(f"{KEY}.entry: {info.entry!r} is not in {info.file} (entries: {names})",
                          hint=f"--set {KEY}.entry=NAME")
    if entry.get("ranking"):
        raise ConfigError(f"{where} is a preference (ranking) dataset: preprocess-sft prepares SFT data only",
                          hint=f"choose an SFT entry: --set {KEY}.entry=NAME")
    update: dict[str, Any] = {}
    if not data.source:
        if not entry.get("file_name"):
            remote = next((k for k in LF_REMOTE if entry.get(k)), None)
            what = f"names no local file ({remote}: {entry[remote]})" if remote else "has no file_name"
            raise ConfigError(f"{where} {what}", hint="download the data and set data.source=PATH")
        file = path.parent / entry["file_name"]
        if file.is_dir():
            raise ConfigError(f"{where}: file_name {entry['file_name']} is a folder",
                              hint="set data.source to one of its files")
        update["source"] = str(file)
    else:
        log.info("%s: data.source %s is used instead of its file_name", where, data.source)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ConfigError(f"{where}: formatting {formatting!r} is not alpaca or sharegpt", hint=f"fix {info.file}")
    if data.format == "auto":
        update["format"] = formatting
    columns = entry.get("columns") or {}
    if not isinstance(columns, dict):
        raise ConfigError(f"{where}: columns must be an object", hint=f"fix {info.file}")
    bad = [k for k in columns if k in LF_UNSUPPORTED_COLUMNS]
    if bad:
        raise ConfigError(f"{where}: columns.{bad[0]} is not supported by preprocess-sft (text SFT data only)",
                          hint="choose a text SFT entry")
    unknown = [k for k in columns if k not in LF_COLUMNS]
    if unknown:
        raise ConfigError(f"{where}: columns.{unknown[0]} is not one of {', '.join(LF_COLUMNS)}", hint=f"fix {info.file}")
    mapped = {LF_COLUMNS[k]: v for k, v in columns.items() if isinstance(v, str) and v}
    if formatting == "alpaca":
        mapped.pop("conversations", None)
    else:
        for k in ("instruction", "input", "output"):
            mapped.pop(k, None)
    mapped = {ours: theirs for ours, theirs in mapped.items() if ours != theirs}
    update["columns"] = {**mapped, **data.columns}
    tags = entry.get("tags")
    if formatting == "sharegpt" and tags and data.tags is None:
        from ftpipe.data.config import ShareGPTTags

        if not isinstance(tags, dict):
            raise ConfigError(f"{where}: tags must be an object", hint=f"fix {info.file}")
        try:
            update["tags"] = ShareGPTTags(**tags)
        except ValueError as exc:
            first = str(exc).splitlines()
            raise ConfigError(f"{where}: tags: {' '.join(first[1:3]) or first[0]}", hint=f"fix {info.file}") from None
    return data.model_copy(update=update), path
