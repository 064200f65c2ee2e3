"""serve's pre-flight per model family: vLLM's model registry (in the serve environment) accepts the
architecture of all six families' models and refuses an unknown one in one line.

A real vLLM server per family, its /tokenize equal to HF's chat template and answers stopping at
end-of-turn, is the serve+smoke cell of the family matrix (tests/e2e/test_family_matrix.py).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/serve/test_families_serve.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAMILY_NAMES

from serve.helpers import SERVE_PYTHON, require_serve_env

REPO = Path(__file__).resolve().parents[2]


PREFLIGHT = r"""
import json, sys
from pathlib import Path
from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project
from ftpipe.serve.served import Served
from ftpipe.serve.serve import check_vllm_architecture
root = Path(sys.argv[1])
project = Project(root=root, prepared=root, outputs=root, logs=root)
out = {}
for folder in sys.argv[2:]:
    served = Served("merged", "vllm", folder, "r1", Path(folder), Path(folder))
    try:
        out[Path(folder).name] = {"ok": check_vllm_architecture(served, project)}
    except InputError as exc:
        out[Path(folder).name] = {"refused": exc.message, "hint": exc.hint}
print(json.dumps(out))
"""


@pytest.mark.slow  # imports vLLM (~20 s on a busy CPU)
def test_vllm_preflight_accepts_every_family_and_refuses_unknown(tmp_path, family_model):
    require_serve_env()
    folders = []
    for name in FAMILY_NAMES:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(family_model(name) / "config.json", folder / "config.json")
        folders.append(folder)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([SERVE_PYTHON, "-c", PREFLIGHT, tmp_path, *folders, unknown], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"llama3": "LlamaForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "phi3.5": "Phi3ForCausalLM", "mistral": "MistralForCausalLM", "gemma": "Gemma4ForCausalLM"}
    for name, arch in expected.items():
        assert result[name] == {"ok": [arch]}, result[name]
    refused = result["unknown"]["refused"]
    assert refused.startswith("serve: architecture NoSuchForCausalLM") and "not supported by vLLM" in refused
    assert "--artifact gguf" in result["unknown"]["hint"]
