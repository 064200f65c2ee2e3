"""`model.chat_template`: the chat template every stage uses instead of the model's own.

A base model (a GGUF without `tokenizer.chat_template`, a pretrained-only checkpoint) has no chat
template, and a model that has one may need another. The key names either a family ftpipe knows
(`chatml`, ftpipe's own text; `llama3`, `qwen2.5`, `qwen3`, `phi3.5`, `mistral`, `gemma`: the real
templates of llama.cpp's collection, `models/templates/*.jinja` of the llama-cpp-python sdist in
the project cache), or a `.jinja` file relative to the project. Read by:

- preprocess-sft (`data/render.py`: the rendered texts and token counts) and finetune-sft /
  finetune-dpo (the masks, the trained texts); the chosen template is then saved with the adapter's
  tokenizer (`chat_template.jinja`), so export-merged, convert-awq, export-gguf, eval-sft and serve
  read it from the adapter / merged folder like any model's own.
- every stage's config hash (the key is in the `model` section), and as an input file (a `.jinja`
  path or a llama.cpp template) of preprocess-sft and finetune-sft, so editing the file reruns them.

Without the key, a model folder with no chat template is refused in `check` (one line naming the
key and the next command). Nothing heavy is imported.

    ftpipe finetune-sft --set model.chat_template=chatml
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

KEY = "model.chat_template"

# ChatML as SmolLM2 / Qwen write it, without a default system prompt and without `{% generation %}`
# tags (the assistant mask of handoff/measure.py finds each turn by rendering prefixes; llama.cpp's
# and vLLM's template engines then read the same text).
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The families of `make-tiny-model --family` (training/families.py) whose released template ships
# with llama.cpp: name -> models/templates/<stem>.jinja.
LLAMA_CPP_TEMPLATES = {
    "llama3": "meta-llama-Llama-3.1-8B-Instruct",
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct",
    "qwen3": "Qwen-Qwen3-0.6B",
    "phi3.5": "microsoft-Phi-3.5-mini-instruct",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407",
    "gemma": "google-gemma-4-31B-it",
}
# Where training/families.py extracts llama.cpp's material (its LLAMA_CPP_PYTHON; a test checks they agree).
LLAMA_CPP_MATERIAL = Path(".cache") / "ftpipe" / "llama.cpp-0.3.36" / "models"
FAMILIES = ("chatml", *LLAMA_CPP_TEMPLATES)

# Files that give a transformers model folder its chat template.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

_PROBE_USER, _PROBE_ASSISTANT = "ftpipe probe question 7f3a", "ftpipe probe answer 2c9e"


@dataclass(frozen=True)
class ChosenTemplate:
    """The template `model.chat_template` names: its text, where it came from, its hash."""

    value: str  # as written in the config: a family name or a path
    kind: str  # "family" | "file"
    text: str
    path: Path | None  # the file read (a .jinja path, or a family's llama.cpp template); None for chatml

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def record(self) -> dict[str, str]:
        """Manifest form: which template, and its sha256."""
        return {"source": KEY, "value": self.value, "kind": self.kind, "sha256": self.sha256}


def resolve(model_cfg, root: Path) -> ChosenTemplate | None:
    """The template `model.chat_template` names, or None when the key is not set. Reads one file at most.

    Raises:
        ConfigError: an unknown family name, a missing or unreadable .jinja file, an empty template.
    """
    value = getattr(model_cfg, "chat_template", None)
    if not value:
        return None
    known = ", ".join(FAMILIES)
    if value == "chatml":
        return ChosenTemplate(value, "family", CHATML, None)
    if value in LLAMA_CPP_TEMPLATES:
        path = Path(root) / LLAMA_CPP_MATERIAL / "templates" / f"{LLAMA_CPP_TEMPLATES[value]}.jinja"
        if not path.is_file():
            raise ConfigError(
                f"{KEY}={value}: its template comes from llama.cpp's collection, not in "
                f"{(LLAMA_CPP_MATERIAL / 'templates').as_posix()}/ yet",
                hint=f"ftpipe make-tiny-model --family {value} --out models/tiny-{value} fetches it once; "
                     f"or set {KEY}=chatml or a .jinja file")
        return ChosenTemplate(value, "family", path.read_text(encoding="utf-8"), path)
    if not value.endswith(".jinja"):
        raise ConfigError(f"{KEY}={value}: not a family ftpipe knows ({known}) nor a .jinja file",
                          hint=f"--set {KEY}=chatml")
    path = Path(value) if Path(value).is_absolute() else Path(root) / value
    if not path.is_file():
        raise ConfigError(f"{KEY}={value}: no such file (relative to the project root)",
                          hint=f"write the template there, or --set {KEY}=chatml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{KEY}={value}: cannot read it ({type(exc).__name__})") from None
    if not text.strip():
        raise ConfigError(f"{KEY}={value}: the file is empty", hint=f"--set {KEY}=chatml")
    return ChosenTemplate(value, "file", text, path)


def folder_has_template(folder: Path) -> bool:
    """Whether a model folder brings a chat template of its own (the files transformers reads it from)."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in _TEMPLATE_FILES) or (folder / "additional_chat_templates").is_dir():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def no_template(where: str, command: str) -> InputError:
    """The one-line refusal for a model without a chat template and no `model.chat_template`."""
    return InputError(
        f"model {where} has no chat template (a base model?): set {KEY} to a family "
        f"({', '.join(FAMILIES)}) or a .jinja file",
        hint=f"{command} --set {KEY}=chatml",
    )


def require(model_cfg, root: Path, model_path: str | None, command: str) -> dict[str, Path]:
    """For a stage's `check`: the chosen template resolves, or the local model folder has its own.

    Returns:
        The template file to record as an input (`chat_template`), or nothing.

    Raises:
        ConfigError: a bad `model.chat_template`.
        InputError: no key and a local model folder without a chat template.
    """
    chosen = resolve(model_cfg, root)
    if chosen is not None:
        return {"chat_template": chosen.path} if chosen.path is not None else {}
    if model_path and not folder_has_template(Path(model_path)):
        raise no_template(model_cfg.path or model_path, command)
    return {}


def apply(tokenizer, chosen: ChosenTemplate | None) -> None:
    """Give `tokenizer` the chosen template (no-op for None) and check that it renders a user /
    assistant chat. Works on transformers tokenizers and data/tokenizer_cache.py's CachedTokenizer.

    Raises:
        ConfigError: the template raises, or drops the user's or the assistant's text.
    """
    if chosen is None:
        return
    tokenizer.chat_template = chosen.text
    if isinstance(getattr(tokenizer, "templates", None), dict):  # CachedTokenizer renders from these
        tokenizer.templates = {"default": chosen.text, "tool_use": chosen.text}
    chat = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - any template error means the same: unusable
        raise ConfigError(f"{KEY}={chosen.value}: the template does not render a user/assistant chat "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})",
                          hint=f"--set {KEY}=chatml") from None
    if not isinstance(text, str) or _PROBE_USER not in text or _PROBE_ASSISTANT not in text:
        raise ConfigError(f"{KEY}={chosen.value}: the rendered chat lacks the user's or the assistant's message",
                          hint=f"--set {KEY}=chatml")
    log.info("chat template: %s=%s (sha256 %s) instead of the model's own", KEY, chosen.value, chosen.sha256[:12])


def use(tokenizer, model_cfg, root: Path, where: str, command: str) -> ChosenTemplate | None:
    """The one way a stage gives its tokenizer the template it renders with: `model.chat_template`
    (resolved and `apply`-checked) over the model's own; refused when neither exists.

    Returns:
        The chosen template, or None when the model's own is used.

    Raises:
        ConfigError: a bad `model.chat_template`.
        InputError: no key and a tokenizer without a chat template (`no_template`, naming `where`
            and `command`).
    """
    chosen = resolve(model_cfg, root)
    apply(tokenizer, chosen)
    if not getattr(tokenizer, "chat_template", None):
        raise no_template(where, command)
    return chosen


def record(tokenizer, chosen: ChosenTemplate | None) -> dict[str, str]:
    """What a manifest says about the template used: the key's value, or the model's own, with its sha256."""
    if chosen is not None:
        return chosen.record()
    text = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    return {"source": "model", "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
