"""Fixtures for the preprocess-sft tests: a project folder on the tiny model, file writers, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


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
