"""The base-model record: written by finetune-sft, read back (resolved) by export, eval and serve."""

from __future__ import annotations

import json

import pytest

import ftpipe.eval.eval_sft as eval_sft
import ftpipe.serve.served as served_module
from ftpipe.core.errors import InputError
from ftpipe.core.model_ref import ModelRef
from ftpipe.core.runs import Project, RunDir
from ftpipe.handoff.base_model import BASE_MODEL_FILE, read_base_model, write_base_model


@pytest.fixture
def run(tmp_path) -> RunDir:
    project = Project(root=tmp_path, prepared=tmp_path / "prepared", outputs=tmp_path / "outputs", logs=tmp_path / "logs")
    run = RunDir(project, "r1")
    run.adapter.mkdir(parents=True)
    return run


def test_written_record_reads_back_as_the_local_model(run, tmp_path):
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/base/config.json").write_text("{}")
    write_base_model(run.adapter, {"id": "org/base", "revision": "abc", "path": "models/base"})
    assert json.loads((run.adapter / BASE_MODEL_FILE).read_text()) == {"id": "org/base", "revision": "abc", "path": "models/base"}
    assert read_base_model(run) == ModelRef(id="org/base", revision="abc", path=str(tmp_path / "models/base"))


@pytest.mark.parametrize("content", [None, "{torn", '{"id": null, "revision": null, "path": null}', "[]"])
def test_missing_or_invalid_record(run, content):
    if content is not None:
        (run.adapter / BASE_MODEL_FILE).write_text(content)
    with pytest.raises(InputError) as info:
        read_base_model(run)
    assert info.value.message == (
        'outputs/r1/adapter/ftpipe_base_model.json: missing or invalid (expected {"id", "revision", "path"}): '
        "cannot tell which base model the adapter belongs to"
    )
    assert info.value.hint == "ftpipe finetune-sft --run r1 --force"


def test_missing_folder_without_hub_id_names_the_record(run):
    write_base_model(run.adapter, {"id": None, "revision": None, "path": "models/gone"})
    with pytest.raises(InputError, match=r"^outputs/r1/adapter/ftpipe_base_model\.json: base model: "
                                         r"model\.path models/gone: no config\.json there$"):
        read_base_model(run)


def test_missing_folder_falls_back_to_the_hub_id(run, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    write_base_model(run.adapter, {"id": "org/base", "revision": "abc", "path": "models/gone"})
    assert read_base_model(run) == ModelRef(id="org/base", revision="abc", path=None)
    # Offline, the hub id must be in the local cache: the error names the record.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(run.project.root / "empty-cache"))
    with pytest.raises(InputError, match=r"ftpipe_base_model\.json: base model: model\.id org/base: not in the local cache"):
        read_base_model(run)


def test_every_reader_is_the_hand_off(run, tmp_path, monkeypatch):
    assert eval_sft.read_base_model is read_base_model  # what eval-sft's pre-flight calls
    # serve: an adapter is served on the base the record names (here: its hub id).
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (run.adapter / "adapter_config.json").write_text('{"r": 8}')
    write_base_model(run.adapter, {"id": "org/base", "revision": "abc", "path": "models/gone"})
    monkeypatch.setattr(served_module, "require_completed", lambda *a: {})
    served = served_module.resolve_artifact(run, "adapter", producers={"adapter": "finetune-sft"})
    assert (served.model, served.base_revision, served.lora_rank) == ("org/base", "abc", 8)
    (run.adapter / BASE_MODEL_FILE).unlink()
    with pytest.raises(InputError, match="missing or invalid"):
        served_module.resolve_artifact(run, "adapter", producers={"adapter": "finetune-sft"})
