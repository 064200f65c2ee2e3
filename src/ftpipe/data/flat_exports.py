"""Label Studio's flat exports, JSON-MIN and CSV: one row per annotation, data fields and answers side by side.

Part of `preprocess-sft`. Label Studio's converter (label-studio-sdk `converter.convert_to_json_min`,
and `convert_to_csv` on the same records) writes, per annotation, the task's data fields (e.g.
`prompt`), `id`, one key per control tag named by its `from_name` holding the prettified result
(a TextArea with one text: that string), then `annotator`, `annotation_id`, `created_at`,
`updated_at`, `lead_time` (and `agreement`). The prompt is `data.label_studio.prompt_field`; the
answer is `data.label_studio.answer_from_name`, or the one field that is neither data nor metadata.

    ftpipe preprocess-sft --source data/project-1-min.json
"""

from __future__ import annotations

from typing import Any

from ftpipe.core.errors import ConfigError
from ftpipe.data.formats import RowError

META = frozenset({"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement", "system"})
ANSWER_NAMES = ("response", "answer", "output", "completion")  # preferred when several fields could be the answer


def is_flat_export(record: Any) -> bool:
    """True for a JSON-MIN / CSV export row: annotation metadata next to the data fields."""
    return (type(record) is dict and "annotation_id" in record and ("lead_time" in record or "annotator" in record)
            and "annotations" not in record and "data" not in record)


def answer_field(records: list[Any], cfg, where: str) -> str:
    """The answer's key: `cfg.answer_from_name`, or the one non-metadata, non-prompt key of the rows.

    Raises:
        ConfigError: no such key, or several candidates (names them, and the key to set).
    """
    if cfg.answer_from_name:
        return cfg.answer_from_name
    candidates: list[str] = []
    for record in records:
        if is_flat_export(record):
            candidates += [k for k in record if k not in META and k != cfg.prompt_field and k not in candidates]
    preferred = [k for k in ANSWER_NAMES if k in candidates]
    if len(candidates) == 1 or len(preferred) == 1:
        return candidates[0] if len(candidates) == 1 else preferred[0]
    what = f"several fields could hold the answer ({', '.join(candidates)})" if candidates else "no field holds an answer"
    raise ConfigError(f"{where}: Label Studio JSON-MIN/CSV export: {what}",
                      hint="--set data.label_studio.answer_from_name=NAME (the TextArea's name)")


def normalise_flat(record: Any, cfg, answer: str) -> dict:
    """One flat export row -> `{"messages": [system?, user prompt, assistant answer]}`.

    Raises:
        RowError: a missing prompt; no answer (reason `no_annotation`: the task was not annotated).
    """
    if type(record) is not dict:
        raise RowError("<row>", "expected an object")
    prompt = record.get(cfg.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError(cfg.prompt_field, "missing" if prompt is None else "expected a non-empty string")
    value = record.get(answer)
    if isinstance(value, dict):  # a TextArea with several texts: {"text": [...]}
        value = value.get("text")
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    if value is None or value == "":
        raise RowError(answer, "no annotation", reason="no_annotation")
    if not isinstance(value, str):
        raise RowError(answer, "expected the text of a TextArea")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
    return {"messages": messages}

