"""`model.chat_template` resolution (ftpipe.handoff.chosen_template): family names, .jinja files,
model folders with and without a template, and the render check, without loading a model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftpipe.core.errors import ConfigError, InputError
from ftpipe.handoff import chosen_template as ct


def _cfg(value=None, path="models/base"):
    return SimpleNamespace(chat_template=value, path=path)


class _Tokenizer:
    """What `apply` needs: a settable chat_template rendered by transformers' Jinja renderer."""

    chat_template = None

    def apply_chat_template(self, conversation, tokenize=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(conversations=[conversation], chat_template=self.chat_template)
        return rendered[0]


def test_no_key_resolves_to_none(tmp_path):
    assert ct.resolve(_cfg(None), tmp_path) is None


def test_chatml_is_built_in(tmp_path):
    chosen = ct.resolve(_cfg("chatml"), tmp_path)
    assert chosen.kind == "family" and chosen.path is None and "<|im_start|>" in chosen.text
    assert chosen.record() == {"source": "model.chat_template", "value": "chatml", "kind": "family",
                               "sha256": chosen.sha256}
    tokenizer = _Tokenizer()
    ct.apply(tokenizer, chosen)
    assert tokenizer.chat_template == ct.CHATML
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_a_jinja_file_relative_to_the_project(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.jinja").write_text(ct.CHATML, encoding="utf-8")
    chosen = ct.resolve(_cfg("t/x.jinja"), tmp_path)
    assert chosen.kind == "file" and chosen.path == tmp_path / "t" / "x.jinja" and chosen.text == ct.CHATML
    assert ct.require(_cfg("t/x.jinja"), tmp_path, None, "ftpipe finetune-sft") == {"chat_template": chosen.path}


@pytest.mark.parametrize("value, message", [
    ("vicuna", "model.chat_template=vicuna: not a family ftpipe knows (chatml, llama3"),
    ("t/missing.jinja", "model.chat_template=t/missing.jinja: no such file"),
    ("t/empty.jinja", "model.chat_template=t/empty.jinja: the file is empty"),
])
def test_bad_values_name_the_key(tmp_path, value, message):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "empty.jinja").write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        ct.resolve(_cfg(value), tmp_path)
    assert message in err.value.one_line() and err.value.exit_code == 2


def test_a_llama_cpp_family_comes_from_the_cached_templates(tmp_path):
    with pytest.raises(ConfigError, match="model.chat_template=qwen2.5: its template comes from llama.cpp"):
        ct.resolve(_cfg("qwen2.5"), tmp_path)
    templates = tmp_path / ct.LLAMA_CPP_MATERIAL / "templates"
    templates.mkdir(parents=True)
    (templates / "Qwen-Qwen2.5-7B-Instruct.jinja").write_text("{{ messages }}", encoding="utf-8")
    chosen = ct.resolve(_cfg("qwen2.5"), tmp_path)
    assert chosen.kind == "family" and chosen.text == "{{ messages }}"


def test_the_material_folder_is_the_one_families_fetches():
    from ftpipe.training.families import CACHE_DIR, LLAMA_CPP_PYTHON

    assert ct.LLAMA_CPP_MATERIAL == CACHE_DIR / f"llama.cpp-{LLAMA_CPP_PYTHON}" / "models"
    from ftpipe.training.families import FAMILIES

    assert {name: f.template for name, f in FAMILIES.items()} == ct.LLAMA_CPP_TEMPLATES


def test_a_folder_without_template_is_refused_naming_the_key(tmp_path):
    folder = tmp_path / "models" / "base"
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "x"}), encoding="utf-8")
    with pytest.raises(InputError) as err:
        ct.require(_cfg(None), tmp_path, str(folder), "ftpipe finetune-sft")
    line = err.value.one_line()
    assert "models/base has no chat template" in line and "set model.chat_template" in line
    assert line.endswith("(next: ftpipe finetune-sft --set model.chat_template=chatml)")
    assert ct.require(_cfg("chatml"), tmp_path, str(folder), "ftpipe finetune-sft") == {}
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}), encoding="utf-8")
    assert ct.folder_has_template(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").write_text("{{ x }}", encoding="utf-8")
    assert ct.require(_cfg(None), tmp_path, str(folder), "ftpipe finetune-sft") == {}


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('nope') }}", "does not render a user/assistant chat"),
    ("{% for m in messages %}{{ m.role }}{% endfor %}", "lacks the user's or the assistant's message"),
])
def test_a_template_that_cannot_render_a_chat_is_refused(tmp_path, template, message):
    (tmp_path / "bad.jinja").write_text(template, encoding="utf-8")
    chosen = ct.resolve(_cfg("bad.jinja"), tmp_path)
    with pytest.raises(ConfigError, match=message):
        ct.apply(_Tokenizer(), chosen)


def test_record_of_the_models_own_template():
    tokenizer = _Tokenizer()
    tokenizer.chat_template = "{{ x }}"
    record = ct.record(tokenizer, None)
    assert record["source"] == "model" and len(record["sha256"]) == 64


def test_vllm_serves_adapters_with_the_template_they_carry(tmp_path):
    from ftpipe.serve.serve import vllm_command
    from ftpipe.serve.served import Served

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = SimpleNamespace(host="127.0.0.1", port=8000, max_model_len=512, dtype="float32", max_num_seqs=None,
                          extra_args=[])
    served = Served("adapter", "vllm", str(tmp_path / "base"), "r1", tmp_path / "manifest.json", adapter,
                    loras=(("r1", adapter),), lora_rank=8, base_revision=None, baseline="r1-base")
    assert "--chat-template" not in vllm_command("python", served, cfg)
    (adapter / "chat_template.jinja").write_text(ct.CHATML, encoding="utf-8")
    argv = vllm_command("python", served, cfg)
    assert argv[argv.index("--chat-template") + 1] == str(adapter / "chat_template.jinja")
