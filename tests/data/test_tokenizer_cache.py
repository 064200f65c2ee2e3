"""The tokenizer cache of preprocess-sft: a cached tokenizer renders and counts exactly like the one
AutoTokenizer loads, misses when a tokenizer file changes, and is never used for remote code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftpipe.data import tokenizer_cache
from ftpipe.data.render import Renderer, load_tokenizer

ROWS = [
    {"messages": [{"role": "user", "content": "Is this good? (review 1)"}, {"role": "assistant", "content": "positive"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  spaced  \n\n lines\t"},
                  {"role": "assistant", "content": "negative"}]},
    {"messages": [{"role": "user", "content": "holds <|im_end|> and <|im_start|>user markers"},
                  {"role": "assistant", "content": "ok <|im_end|>"}]},
    {"messages": [{"role": "user", "content": "héllo wörld 你好 🙂"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "name": "get_weather", "content": "sunny"},
                  {"role": "assistant", "content": "It is sunny."}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]},
]

# A template that uses the special tokens and the tools, as Llama/Qwen templates do.
TEMPLATE = (
    "{{- bos_token or '' }}{%- if tools %}<tools>{{ tools | tojson }}</tools>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{%- if m.tool_calls %}{{ m.tool_calls | tojson }}{%- endif %}{{ eos_token }}\n{%- endfor %}"
)


def _model(base: Path, dest: Path, template: str | None = None, **config) -> Path:
    shutil.copytree(base, dest)
    if template is not None:
        (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    if config:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        cfg.update(config)
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def _cfg(path: Path, trust_remote_code: bool = False):
    return SimpleNamespace(path=str(path), id=None, revision=None, trust_remote_code=trust_remote_code)


def _renders(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False) for r in ROWS]


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["model-template", "special-tokens-and-tools"])
def test_cached_tokenizer_renders_and_counts_like_autotokenizer(tmp_path, tiny_model_dir, template):
    model = _model(tiny_model_dir, tmp_path / "model", template, bos_token="<|im_start|>")
    fresh, _ = load_tokenizer(_cfg(model), tmp_path)
    entries = list((tmp_path / ".cache/ftpipe/tokenizers").glob("*.json"))
    assert len(entries) == 1 and type(fresh).__name__ == "TokenizersBackend"
    cached, _ = load_tokenizer(_cfg(model), tmp_path)
    assert isinstance(cached, tokenizer_cache.CachedTokenizer)
    assert cached.class_name == "TokenizersBackend" and len(cached) == len(fresh)
    assert _renders(cached) == _renders(fresh)
    texts = _renders(fresh) + ["<|im_end|><|im_start|>", "plain text", " leading space", "a\n\n\nb"]
    assert Renderer(cached).count(texts) == Renderer(fresh).count(texts)
    assert cached(texts)["input_ids"] == fresh(texts, add_special_tokens=False)["input_ids"]
    measured = [Renderer(t).measure([dict(r) for r in ROWS]) for t in (fresh, cached)]
    shown = [[repr(n) if isinstance(n, Exception) else n for n in m] for m in measured]
    assert shown[0] == shown[1]
    # The tiny model's own template has no tool format: its tool row is refused (never an empty
    # turn), the others are counted; the template with tools counts every row.
    refused = {4} if template is None else set()
    assert {i for i, n in enumerate(measured[0]) if isinstance(n, Exception)} == refused, shown[0]
    assert all(isinstance(n, int) and n > 0 for i, n in enumerate(measured[0]) if i not in refused)


def test_named_templates_pick_tool_use_when_tools_are_given(tmp_path, tiny_model_dir):
    model = _model(tiny_model_dir, tmp_path / "model")
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates/tool_use.jinja").write_text(TEMPLATE, encoding="utf-8")
    fresh, _ = load_tokenizer(_cfg(model), tmp_path)
    assert isinstance(fresh.chat_template, dict) and set(fresh.chat_template) == {"default", "tool_use"}
    cached, _ = load_tokenizer(_cfg(model), tmp_path)
    assert isinstance(cached, tokenizer_cache.CachedTokenizer)
    assert _renders(cached) == _renders(fresh)
    assert "<tools>" in _renders(cached)[-1] and "<tools>" not in _renders(cached)[0]


def test_a_changed_tokenizer_file_misses_the_cache(tmp_path, tiny_model_dir):
    model = _model(tiny_model_dir, tmp_path / "model")
    load_tokenizer(_cfg(model), tmp_path)
    (model / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    again, _ = load_tokenizer(_cfg(model), tmp_path)
    assert not isinstance(again, tokenizer_cache.CachedTokenizer)  # a miss: loaded by AutoTokenizer
    assert len(list((tmp_path / ".cache/ftpipe/tokenizers").glob("*.json"))) == 2
    cached, _ = load_tokenizer(_cfg(model), tmp_path)
    assert isinstance(cached, tokenizer_cache.CachedTokenizer) and "<tools>" in _renders(cached)[-1]


def test_weights_are_not_part_of_the_key(tmp_path, tiny_model_dir):
    model = _model(tiny_model_dir, tmp_path / "model")
    key = tokenizer_cache.entry_path(SimpleNamespace(path=str(model)), _cfg(model), tmp_path)
    (model / "model.safetensors").write_bytes(b"retrained")
    assert tokenizer_cache.entry_path(SimpleNamespace(path=str(model)), _cfg(model), tmp_path) == key
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text() + " ")
    assert tokenizer_cache.entry_path(SimpleNamespace(path=str(model)), _cfg(model), tmp_path) != key


def test_remote_code_and_hub_ids_are_never_cached(tmp_path, tiny_model_dir):
    ref = SimpleNamespace(path=str(tiny_model_dir))
    assert tokenizer_cache.entry_path(ref, _cfg(tiny_model_dir, trust_remote_code=True), tmp_path) is None
    assert tokenizer_cache.entry_path(SimpleNamespace(path=None), _cfg(tiny_model_dir), tmp_path) is None


def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path, tiny_model_dir):
    model = _model(tiny_model_dir, tmp_path / "model")
    load_tokenizer(_cfg(model), tmp_path)
    (entry,) = (tmp_path / ".cache/ftpipe/tokenizers").glob("*.json")
    entry.write_text('{"format": 1, "backend": "not a tokenizer"')
    tokenizer, _ = load_tokenizer(_cfg(model), tmp_path)
    assert not isinstance(tokenizer, tokenizer_cache.CachedTokenizer)
    assert json.loads(entry.read_text())["format"] == tokenizer_cache.FORMAT
    assert isinstance(load_tokenizer(_cfg(model), tmp_path)[0], tokenizer_cache.CachedTokenizer)


def test_a_cached_load_imports_neither_torch_nor_transformers_models(tmp_path, tiny_model_dir):
    model = _model(tiny_model_dir, tmp_path / "model")
    load_tokenizer(_cfg(model), tmp_path)
    code = (
        "import sys; from types import SimpleNamespace as N; from pathlib import Path\n"
        "from ftpipe.data.render import Renderer, load_tokenizer\n"
        f"tok, _ = load_tokenizer(N(path={str(model)!r}, id=None, revision=None, trust_remote_code=False), Path({str(tmp_path)!r}))\n"
        "n = Renderer(tok).measure([{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}])\n"
        "print(type(tok).__name__, n, 'torch' in sys.modules, 'transformers.models.auto' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    name, *_, torch_loaded, auto_loaded = out.stdout.split()
    assert (name, torch_loaded, auto_loaded) == ("CachedTokenizer", "False", "False")
