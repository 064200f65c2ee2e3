"""ollama-load against a fake Ollama server (see fake_ollama.py): REST call sequence, template,
stops, and the errors users meet. The GGUF and merged folder are fabricated (real conversion is
covered by test_gguf.py, which also runs ollama-load on a real GGUF)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.conftest import run_cli
from tests.export.conftest import make_project
from tests.export.fake_ollama import FakeOllama


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_model_dir):
    """A run whose export-gguf is completed: merged/ = the tiny model, gguf/model-q8_0.gguf = bytes."""
    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    root = make_project(tmp_path_factory.mktemp("proj-ollama"), tiny_model_dir)
    loaded = load_config(root / "config.yaml")
    run = new_run(Project.from_config(loaded), "r1")

    def body(ctx):
        shutil.copytree(tiny_model_dir, run.merged)
        run.gguf.mkdir(parents=True)
        (run.gguf / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
        return StageResult(outputs=[run.gguf])

    record_stage("export-gguf", loaded, run, body)
    return root


def _load(root, url, *extra):
    return run_cli("ollama-load", "--config", str(root / "config.yaml"), "--run", "r1",
                   "--set", f"ollama.host={url}", *extra, cwd=root)


@pytest.mark.slow
def test_rest_call_sequence_template_and_stops(gguf_run):
    data = (gguf_run / "outputs/r1/gguf/model-q8_0.gguf").read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with FakeOllama() as fake:
        result = _load(gguf_run, fake.url)
        assert result.code == 0, result.output
        assert fake.calls == [
            ("HEAD", f"/api/blobs/{digest}"),
            ("POST", f"/api/blobs/{digest}"),
            ("POST", "/api/create"),
            ("POST", "/api/chat"),
        ]
        created = fake.models["r1"]
        assert created["files"] == {"model-q8_0.gguf": digest}
        assert created["parameters"] == {"stop": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]}
        assert created["template"].startswith("{{- range .Messages }}<|im_start|>")
        assert created["stream"] is False
        # The prompt the server built is the tiny model's ChatML for the first val conversation
        # (system and user turn; the answer left off).
        system, user, answer = json.loads(
            (gguf_run / "prepared/sentiment/val.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
        assert (system["role"], user["role"], answer["role"]) == ("system", "user", "assistant")
        assert fake.prompts == [
            f"<|im_start|>system\n{system['content']}<|im_end|>\n"
            f"<|im_start|>user\n{user['content']}<|im_end|>\n<|im_start|>assistant\n"
        ]
        # Second time: the server has the blob, so no upload.
        again = _load(gguf_run, fake.url)
        assert again.code == 0, again.output
        assert fake.calls[4:] == [("HEAD", f"/api/blobs/{digest}"), ("POST", "/api/create"), ("POST", "/api/chat")]
    manifest = json.loads((gguf_run / "logs/r1/ollama-load/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["template_family"] == "chatml"
    assert manifest["metrics"]["blob_uploaded"] is False
    assert manifest["metrics"]["done_reason"] == "stop"


@pytest.mark.slow
def test_answer_that_does_not_stop_fails(gguf_run):
    with FakeOllama(answer_stops=False) as fake:
        result = _load(gguf_run, fake.url)
    assert result.code == 1
    assert "error: Ollama model 'r1' did not stop within ollama.max_tokens=64 (done_reason 'length')" in result.stderr


@pytest.mark.slow
def test_no_server_exits_2(gguf_run):
    with FakeOllama() as fake:
        url = fake.url  # the port is free again once the fake is closed
    result = _load(gguf_run, url)
    assert result.code == 2
    assert f"error: no Ollama server at {url} (connection refused)" in result.stderr


def test_missing_gguf_type_exits_2(gguf_run):
    result = run_cli("ollama-load", "--config", str(gguf_run / "config.yaml"), "--run", "r1",
                     "--set", "ollama.gguf=f16", cwd=gguf_run)
    assert result.code == 2
    assert "outputs/r1/gguf/model-f16.gguf not found: ollama.gguf is f16 but export-gguf did not write it" in result.stderr


def test_unknown_template_family_exits_2(gguf_run, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(gguf_run, root, symlinks=True)
    (root / "outputs/r1/merged/chat_template.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", encoding="utf-8"
    )
    result = run_cli("ollama-load", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert result.code == 2
    assert "outputs/r1/merged/chat_template.jinja: the chat template is not one of the known families" in result.stderr


def test_dry_run_writes_the_modelfile_without_a_server(gguf_run):
    with FakeOllama() as fake:
        url = fake.url  # closed again: nothing listens, and the dry run must not care
    result = _load(gguf_run, url, "--dry-run")
    assert result.code == 0, result.output
    modelfile = gguf_run / "outputs/r1/ollama/Modelfile"
    assert "outputs/r1/ollama/Modelfile" in result.output
    text = modelfile.read_text()
    assert "\nFROM ../gguf/model-q8_0.gguf\n" in text
    assert (modelfile.parent / "../gguf/model-q8_0.gguf").resolve().is_file()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in text
    # The turn markers, then the end-of-turn tokens of the tiny model's generation_config.json.
    assert text.endswith('PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n')
    assert "# tools: refused (" in text
    manifest = json.loads((gguf_run / "logs/r1/ollama-load/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["dry_run"] is True
    assert manifest["metrics"]["modelfile"] == "outputs/r1/ollama/Modelfile"
    assert "dry run (no server contacted)" in result.output


def test_template_that_renders_differently_exits_2(gguf_run, tmp_path):
    """ChatML markers, but one character differs from every ChatML Go template: refused in one line
    naming the closest family and the first differing characters, before any server call."""
    root = tmp_path / "p"
    shutil.copytree(gguf_run, root, symlinks=True)
    shutil.rmtree(root / "outputs/r1/ollama", ignore_errors=True)  # a dry run of another test may be there
    merged = root / "outputs/r1/merged"
    template = (merged / "chat_template.jinja").read_text(encoding="utf-8")
    (merged / "chat_template.jinja").write_text(template.replace("'<|im_end|>\\n'", "'<|im_end|>\\n\\n'"), encoding="utf-8")
    assert (merged / "chat_template.jinja").read_text(encoding="utf-8") != template
    result = run_cli("ollama-load", "--config", str(root / "config.yaml"), "--run", "r1", "--dry-run", cwd=root)
    assert result.code == 2, result.output
    assert "outputs/r1/merged/chat_template.jinja: the chatml Ollama template renders the" in result.stderr
    assert "differently from the model's chat template at character" in result.stderr
    assert not (root / "outputs/r1/ollama/Modelfile").exists()


@pytest.mark.parametrize("name", ["llama3", "qwen2.5", "qwen3", "phi3.5", "mistral",
                                  pytest.param("gemma", marks=pytest.mark.slow)])
def test_dry_run_per_family(family_model, tmp_path, name):
    """Each family's merged folder: the Modelfile carries its Go template and every end-of-turn token."""
    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult
    from ftpipe.export.chat_families import FAMILIES

    model = family_model(name)
    root = make_project(tmp_path / "p", model, prepared=False)  # a dry run chats with nobody: no val split needed
    loaded = load_config(root / "config.yaml")
    run = new_run(Project.from_config(loaded), "r1")

    def body(ctx):
        shutil.copytree(model, run.merged)
        run.gguf.mkdir(parents=True)
        (run.gguf / "model-q8_0.gguf").write_bytes(b"GGUF")
        return StageResult(outputs=[run.gguf])

    record_stage("export-gguf", loaded, run, body)
    result = run_cli("ollama-load", "--config", str(root / "config.yaml"), "--run", "r1", "--dry-run", cwd=root)
    assert result.code == 0, result.output
    metrics = json.loads((root / "logs/r1/ollama-load/manifest.json").read_text())["metrics"]
    family = next(f for f in FAMILIES if f.name == metrics["template_family"])
    assert family.name == {"llama3": "llama3.1", "qwen2.5": "qwen2.5", "qwen3": "chatml", "phi3.5": "phi3",
                           "mistral": "mistral-nemo", "gemma": "gemma4"}[name]
    text = (root / "outputs/r1/ollama/Modelfile").read_text()
    assert f'TEMPLATE """{family.template}"""' in text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    eos_ids = json.loads((model / "generation_config.json").read_text())["eos_token_id"]
    for token in tok.convert_ids_to_tokens(eos_ids):
        assert f"PARAMETER stop {json.dumps(token)}" in text
    assert metrics["tools"].startswith("refused: ")
