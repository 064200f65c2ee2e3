"""Prepared preference pairs as every stage reads them.

`preprocess-dpo` writes prepared/<preference.name>/train.jsonl and val.jsonl, one pair per line in
TRL's conversational preference shape:

    {"prompt": [{"role": "system"|"user"|"assistant", "content": str}, ...],   # ends with a user turn
     "chosen": [{"role": "assistant", "content": str}],
     "rejected": [{"role": "assistant", "content": str}]}

finetune-dpo trains on them, eval-sft scores held-out pairs (preference accuracy), the report
shows them. They are read only through `read_pairs` (streaming, the same errors everywhere).
Only the standard library, `ftpipe.core` and `ftpipe.handoff.prepared` (its JSON-lines reader) are imported.

    ftpipe preprocess-dpo --config config.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ftpipe.core.errors import InputError
from ftpipe.handoff.prepared import json_lines

if TYPE_CHECKING:
    from ftpipe.core.runs import Project

Messages = list[dict[str, Any]]
Pair = dict[str, Messages]  # {"prompt": [...], "chosen": [...], "rejected": [...]}

PRODUCE = "ftpipe preprocess-dpo"
REDO = "ftpipe preprocess-dpo --force"
KEYS = ("prompt", "chosen", "rejected")


def pairs_dir(project: Project, name: str) -> Path:
    """prepared/<name>/: where preprocess-dpo writes the pairs of preference set `name`."""
    return project.prepared_dir(name)


def read_pairs(path: Path, limit: int | None = None) -> Iterator[Pair]:
    """The pairs of a prepared preference split, one at a time, as written.

    Args:
        path: prepared/<name>/train.jsonl or val.jsonl.
        limit: stop after this many pairs (None: all).

    Raises:
        InputError: the file is missing (now); a line is not a pair (while iterating), naming
            `file:line` and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prepared preference split not found", hint=PRODUCE)
    return _pairs(path, limit)


def _pairs(path: Path, limit: int | None) -> Iterator[Pair]:
    if limit is not None and limit <= 0:
        return
    count = 0
    for number, row in json_lines(path, REDO):
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected an object with prompt, chosen, rejected", hint=REDO)
        for key in KEYS:
            messages = row.get(key)
            if not isinstance(messages, list) or not messages:
                raise InputError(f"{path}:{number}: {key}: expected a non-empty list of messages", hint=REDO)
            for i, message in enumerate(messages):
                if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                        or not isinstance(message.get("content"), str)):
                    raise InputError(f"{path}:{number}: {key}[{i}]: expected an object with string `role` "
                                     "and `content`", hint=REDO)
        yield {key: row[key] for key in KEYS}
        count += 1
        if limit is not None and count >= limit:
            return
