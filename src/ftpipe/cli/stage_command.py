"""The one generic stage command: every row of the stage table becomes `ftpipe <stage>`.

A command takes the common options (--config, --set, --run for run-scoped stages, --runtime,
--force unless the stage always runs) plus the options of its row, and does what every stage
command does: load the config (option values at flag precedence) -> pre-flight -> re-execute
itself in the stage's environment when this is not it -> run the stage -> print the result.

    ftpipe finetune-sft --config debug_config.yaml --run demo --resume-from latest
    ftpipe convert-awq --config debug_config.yaml --run demo
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, get_args, get_origin

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, ForceOpt, RunOpt, RuntimeOpt, SetOpt, delegate, load, runs_here
from ftpipe.stages import Option, Stage

NewRunOpt = Annotated[
    Optional[str],
    typer.Option("--run", help="Run name: reuse (resume, or skip when up to date) instead of a new run-<model>-<data>-<n>."),
]


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def common_params(stage: Stage) -> list[inspect.Parameter]:
    """--config, --set, --run (run-scoped stages), --runtime."""
    params = [_param("config", ConfigOpt, DEFAULT_CONFIG), _param("sets", SetOpt, None)]
    if stage.scope == "run":
        params.append(_param("run", RunOpt, None))
    elif stage.scope == "new-run":
        params.append(_param("run", NewRunOpt, None))
    params.append(_param("runtime", RuntimeOpt, None))
    return params


def option_help(option: Option) -> str:
    """The option's help; for one that sets a config key, the field's description and choices."""
    if option.key is None:
        return option.help
    from ftpipe.config import Config

    section, name = option.key.split(".")
    field = Config.model_fields[section].annotation.model_fields[name]
    text = option.help or field.description or ""
    if get_origin(field.annotation) is Literal and not option.help:
        text += f" One of: {', '.join(map(str, get_args(field.annotation)))}."
    return f"{text} \\[{option.key}]"  # the config key it sets (escaped: --help renders rich markup)


def option_param(option: Option) -> inspect.Parameter:
    """A table `Option` as a Typer parameter."""
    kind: Any = option.type
    help_text = option_help(option)
    extra: dict[str, Any] = {}
    if option.min is not None:
        extra["min"] = option.min
    if option.envvar:
        extra.update(envvar=option.envvar, show_envvar=True)
    if kind is bool:
        return _param(option.dest, Annotated[bool, typer.Option(option.flag, help=help_text)], bool(option.default))
    return _param(option.dest, Annotated[Optional[kind], typer.Option(option.flag, help=help_text, **extra)], option.default)


def build(name: str, params: list[inspect.Parameter], body: Callable[..., None], doc: str) -> Callable[..., None]:
    """A function Typer can register: `params` as its signature, `body(**values)` as what it does."""
    def command(*args: Any, **values: Any) -> None:
        body(*args, **values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    command.__doc__ = doc
    return command


def split_options(stage: Stage, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config flags, stage options) from the values of a row's options."""
    flags: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for option in stage.options:
        value = values.get(option.dest)
        if option.key is None:
            options[option.dest] = value
        elif isinstance(value, bool):
            flags[option.key] = True if value else None  # an unset switch keeps the config's value
        elif isinstance(value, Path):
            flags[option.key] = str(value.resolve() if option.absolute else value)
        else:
            flags[option.key] = value
    return flags, options


def register(app: typer.Typer, stage: Stage) -> None:
    """Add `ftpipe <stage>` to the app."""
    params = common_params(stage)
    if stage.force:
        params.append(_param("force", ForceOpt, False))
    params += [option_param(o) for o in stage.options]

    def body(**values: Any) -> None:
        from ftpipe import stages
        from ftpipe.cli import display

        flags, options = split_options(stage, values)
        loaded = load(values["config"], values["sets"], flags={"runtime.mode": values["runtime"], **flags})
        run_name, force = values.get("run"), values.get("force", False)
        env = stages.environment_of(stage, loaded.config)
        if not runs_here(env, loaded):
            if stage.preflight_on_host:  # a missing input or environment is one line from the host CLI
                stages.prepare(stage, loaded, run_name, force, **options)
            delegate(env, loaded)
        with display.progress(stage.progress) as progress:
            ctx, inputs = stages.prepare(stage, loaded, run_name, force, progress=progress, **options)
            result = stages.run_prepared(ctx, inputs)
        display.show(stage.display, result, stage.name)

    app.command(stage.name)(build(stage.name, params, body, stage.help))
