"""The config loader and the sections every stage shares (model, paths, runtime, secrets).

The root model that nests one section per stage is assembled from the stage table in
`ftpipe/config.py`; this module knows no stage. Precedence: defaults < YAML (`config.yaml` / `debug_config.yaml`) < environment
(`FTPIPE__SECTION__KEY=value`) < `--set section.key=value` < explicit CLI flags.
Every problem is collected and reported once, naming the key and where it came from
(`config.yaml:12: finetune.lr: unknown key`), as a `ConfigError` (exit 2).

    ftpipe print-runtime --config debug_config.yaml --set finetune.max_steps=10
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator

from ftpipe.core.configbase import Section
from ftpipe.core.errors import ConfigError
from ftpipe.core.fsutil import sha256_text
from ftpipe.core.secrets import register_env_secrets, register_secret

ENV_PREFIX = "FTPIPE__"


class TinyModelConfig(Section):
    """A small random-init model with a locally trained tokenizer (no hub download)."""

    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture of the model with a locally trained tokenizer (no family).")
    family: Literal["llama3", "qwen2.5", "qwen3", "phi3.5", "mistral", "gemma"] | None = Field(
        None, description="Build this model family instead: its architecture, real tokenizer, chat template and "
        "special tokens (from llama.cpp's vocabularies and templates); arch, vocab_size and tie_word_embeddings "
        "then come from the family.")
    hidden_size: int = Field(128, gt=0, description="Hidden size (multiple of 128 for AWQ).")
    intermediate_size: int = Field(256, gt=0, description="MLP size (multiple of 128 for AWQ).")
    num_layers: int = Field(4, gt=0, description="Decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (GQA).")
    vocab_size: int = Field(4096, ge=300, description="Target BPE vocabulary size.")
    max_position_embeddings: int = Field(1024, gt=0, description="Context length.")
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and lm_head.")
    seed: int = Field(0, description="Seed for tokenizer corpus order and weight init.")


class ModelConfig(Section):
    """Which base model to fine-tune: a hub id (with a pinned revision) or a local folder."""

    id: str | None = Field(None, description="Hugging Face hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct.")
    revision: str | None = Field(
        None, description="Hub revision (commit sha or tag) to pin; recorded in every manifest."
    )
    path: str | None = Field(
        None, description="Local model folder (relative to the project root); wins over `id`."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub to run. Off unless you trust the repo."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype to load the base model in; `auto` keeps the checkpoint's dtype."
    )
    tiny: TinyModelConfig | None = Field(
        None,
        description="Build a tiny local model at `path` (no download) when it does not exist yet.",
    )
    chat_template: str | None = Field(
        None,
        description="The chat template to train and serve with, instead of the model's own (needed for a base "
        "model without one): a family (chatml; llama3, qwen2.5, qwen3, phi3.5, mistral, gemma from llama.cpp's "
        "templates) or a .jinja file relative to the project. The adapter and merged model carry it.",
        json_schema_extra={"in_hash": "when set"},
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if not self.id and not self.path:
            raise ValueError("set model.id (hub id) or model.path (local folder)")
        if self.tiny is not None and not self.path:
            raise ValueError("model.tiny needs model.path: the folder to build the tiny model in")
        return self


class PathsConfig(Section):
    """Where things live. Relative paths are relative to the project root."""

    root: str | None = Field(
        None, description="Project root; default: the folder holding the config file."
    )
    prepared: str = Field("prepared", description="Prepared datasets: prepared/<dataset>/.")
    outputs: str = Field("outputs", description="Run artifacts: outputs/<run>/.")
    logs: str = Field("logs", description="Run logs and manifests: logs/<run>/<stage>/.")


class RuntimeConfig(Section):
    """Where stages run: local venvs or Docker Compose services (see core/executor.py)."""

    mode: Literal["local", "compose"] = Field(
        "local", description="`local`: stage venvs (.venv, .venv-awq...); `compose`: services."
    )
    compose_file: str = Field("docker-compose.yml", description="Compose file for `compose` mode.")
    container_root: str = Field(
        "/workspace", description="Where the project root is mounted inside every service."
    )


class SecretsConfig(Section):
    """Credentials. Prefer the environment (HF_TOKEN...); values here are redacted everywhere."""

    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated models.")


@dataclass
class LoadedConfig:
    """A validated config plus where it came from (for messages, hashes and `print-runtime`)."""

    config: Any  # the root model of ftpipe/config.py: one attribute per section
    source: Path | None
    root: Path
    origins: dict[str, str] = field(default_factory=dict)

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections, the basis of stage skipping."""
        data = {name: _hashed(getattr(self.config, name)) for name in sections}
        return sha256_text(json.dumps(data, sort_keys=True))

    def redacted(self) -> dict[str, Any]:
        """The whole resolved config as JSON data, secrets shown as `**********`."""
        return self.config.model_dump(mode="json")


def _hashed(section) -> dict[str, Any]:
    """A section's values, without the fields marked `in_hash: False` (they cannot change the output,
    e.g. a worker count), so changing them does not rerun the stage, and without the fields marked
    `in_hash: "when set"` while they are None (a key added later leaves the hashes of configs that do
    not use it, and so their completed stages, as they were)."""
    data = section.model_dump(mode="json")
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and (extra.get("in_hash") is False
                                        or (extra.get("in_hash") == "when set" and data.get(name) is None)):
            data.pop(name, None)
    return data


def load_config(
    schema: type[Section],
    path: Path | None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> LoadedConfig:
    """Load, merge and validate the config.

    Args:
        schema: the root model (`ftpipe.config.Config`).
        path: YAML file (`config.yaml`); None uses defaults only.
        overrides: `section.key=value` strings from `--set` (values parsed as YAML scalars).
        environ: environment (default `os.environ`); `FTPIPE__SECTION__KEY=value` entries apply.
        flags: dotted keys set by explicit CLI flags (highest precedence); None values are ignored.

    Returns:
        The validated config with its origins and project root.

    Raises:
        ConfigError: listing every invalid key with its origin (file:line, env var or --set).
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        data, origins = _read_yaml(path)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
            _set_dotted(data, dotted, _parse_scalar(value), origins, f"environment {name}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value", hint="ftpipe --help")
        dotted, value = item.split("=", 1)
        _set_dotted(data, dotted.strip(), _parse_scalar(value), origins, f"--set {dotted.strip()}")
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value, origins, f"flag for {dotted}")

    try:
        config = schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins, path)) from None

    if config.paths.root:
        root = Path(config.paths.root)
        if not root.is_absolute():
            root = (path.parent if path else Path.cwd()) / root
    else:
        root = path.parent if path else Path.cwd()
    register_env_secrets(env)
    _register_config_secrets(config)
    return LoadedConfig(config=config, source=path, root=root.resolve(), origins=origins)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found", hint="pass --config PATH (e.g. debug_config.yaml)"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or type(exc).__name__})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections, got {type(data).__name__}")
    origins: dict[str, str] = {}
    _record_lines(node, "", path, origins)
    return data, origins


def _record_lines(node: Any, prefix: str, path: Path, origins: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            origins[dotted] = f"{path}:{key_node.start_mark.line + 1}"
            _record_lines(value_node, dotted + ".", path, origins)


def _parse_scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value.strip() else value
    except yaml.YAMLError:
        return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origins: dict[str, str], origin: str) -> None:
    parts = [p for p in dotted.split(".")]
    if not all(parts):
        raise ConfigError(f"{origin}: {dotted!r} is not a dotted key like finetune.max_steps")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            if child is not None:
                raise ConfigError(f"{origin}: {'.'.join(parts[: i + 1])} is not a section")
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    origins[dotted] = origin


def _describe(exc: ValidationError, origins: dict[str, str], path: Path | None) -> str:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        dotted = ".".join(loc)
        origin = _closest_origin(loc, origins) or (str(path) if path else "defaults")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        problems.append(f"{origin}: {dotted or '<root>'}: {msg}")
    return "; ".join(problems)


def _closest_origin(loc: list[str], origins: dict[str, str]) -> str | None:
    for end in range(len(loc), 0, -1):
        found = origins.get(".".join(loc[:end]))
        if found:
            return found
    return None


def _register_config_secrets(model: Any) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            register_secret(value.get_secret_value())
        elif isinstance(value, Section):
            _register_config_secrets(value)
