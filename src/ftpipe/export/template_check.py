"""Does every consumer of a model build the same prompt? Training, vLLM, GGUF/llama.cpp and Ollama.

Used by `ollama-load` (choose the Ollama template family by rendering) and by the command

    ftpipe check-template --model outputs/my-run/merged

A fixed set of conversations (no system message, a system message, several turns, and tools when
the HF template has a tool format) is rendered the way each consumer renders it:

- training: HF `apply_chat_template` text, ids with `add_special_tokens=False` (ftpipe's SFT);
- vLLM: the same Jinja template; vLLM tokenizes chat prompts with `add_special_tokens=False`
  (`ChatCompletionRequest.add_special_tokens` defaults to False, `default_chat_tok_params`), so the
  rule is reproduced with the HF tokenizer, without importing vllm;
- GGUF/llama.cpp (llama-server, `llama-cli -cnv`): the same text; when the tokenizer adds BOS
  (what the converter writes as `tokenizer.ggml.add_bos_token`) llama.cpp's chat code drops a BOS
  the template wrote and tokenizes with BOS added (common/chat.cpp), so a template without BOS
  gains one. llama-cpp-python's Jinja chat handler (ftpipe's GGUF server) tokenizes the rendered
  text as is: the training row;
- Ollama: ftpipe's Go template of the chosen family, BOS added by Ollama's tokenizer as above.

Every consumer is compared with training: the text (first differing character), then the ids
(first differing token; a double BOS is named).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ftpipe.core.errors import InputError
from ftpipe.export.chat_families import ChatFamily, candidates
from ftpipe.export.gotemplate import ollama_values, render
from ftpipe.handoff.chat_template import adds_bos as tokenizer_adds_bos
from ftpipe.handoff.chat_template import generation_eos_ids, tool_support

log = logging.getLogger(__name__)

_SYSTEM = {"role": "system", "content": "You are a terse assistant."}
PROBES: dict[str, list[dict[str, Any]]] = {
    "no-system": [{"role": "user", "content": "Hi, who are you?"}],
    "system": [_SYSTEM, {"role": "user", "content": "Hi, who are you?"}],
    "multi-turn": [
        _SYSTEM,
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "An assistant."},
        {"role": "user", "content": "Name two colours."},
        {"role": "assistant", "content": "Red and blue."},
        {"role": "user", "content": "One more?"},
    ],
}
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name."}},
                       "required": ["city"]},
    },
}]
TOOL_PROBE = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "{\"temperature\": 21}"},
]

RenderHF = Callable[[list, "list | None"], str]


def hf_renderer(chat_template: str, special_tokens: dict[str, Any]) -> RenderHF:
    """`render(messages, tools)`: the HF chat template's text with the generation prompt (what
    `tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)` returns)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render_hf(messages: list, tools: list | None = None) -> str:
        rendered, _ = render_jinja_template(
            [messages], tools=tools, chat_template=chat_template, add_generation_prompt=True, **special_tokens,
        )
        return rendered[0]

    return render_hf


def tokenizer_renderer(tokenizer) -> RenderHF:
    """The renderer of a loaded HF tokenizer (its template and special tokens)."""
    return hf_renderer(tokenizer.chat_template, dict(tokenizer.special_tokens_map))


def first_difference(a: str | list, b: str | list) -> int | None:
    """Index of the first differing item, or None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _excerpt(got: str, expected: str, at: int) -> str:
    return f"{got[at:at + 30]!r} vs {expected[at:at + 30]!r}"


def hf_probe_texts(render_hf: RenderHF, bos: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The HF text of each probe with the BOS text `bos` removed (Ollama adds it as a token: pass None
    when the GGUF adds no BOS, `gguf_bos_text`), and the probes
    the HF template refuses (raise_exception: e.g. Gemma 2 has no system role) with the reason."""
    from jinja2 import TemplateError

    texts, refused = {}, {}
    for name, messages in PROBES.items():
        try:
            text = render_hf(messages, None)
        except TemplateError as exc:
            refused[name] = str(exc)
            continue
        texts[name] = text[len(bos):] if bos and text.startswith(bos) else text
    return texts, refused


def choose_family(render_hf: RenderHF, chat_template: str | None, bos: str | None, where: str) -> ChatFamily:
    """The family whose Go template renders every probe conversation exactly as the HF template.

    Raises:
        InputError: no template; no known family's markers; or no candidate renders identically
            (the closest one's first differing characters named).
    """
    found = candidates(chat_template, where)
    texts, refused = hf_probe_texts(render_hf, bos)
    if not texts:
        raise InputError(f"{where}: the chat template refuses every probe conversation ({next(iter(refused.values()))})")
    closest: tuple[int, str] | None = None
    for family in found:
        for name, expected in texts.items():
            got = render(family.template, ollama_values(PROBES[name]))
            at = first_difference(got, expected)
            if at is not None:
                if closest is None or at > closest[0]:
                    closest = (at, f"the {family.name} Ollama template renders the {name} conversation differently "
                                   f"from the model's chat template at character {at}: {_excerpt(got, expected, at)}")
                break
        else:
            log.info("chat template family %s: its Go template renders %s exactly (refused by the HF template: %s)",
                     family.name, ", ".join(texts), ", ".join(refused) or "none")
            return family
    raise InputError(f"{where}: {closest[1]}",
                     hint="create the Ollama model by hand with a Modelfile TEMPLATE matching chat_template.jinja, "
                     "or add the family to ftpipe/export/chat_families.py")


def stop_strings(family: ChatFamily, tokenizer, model_dir: Path) -> list[str]:
    """The family's turn markers, then every end-of-turn token of the model: the tokens of
    `generation_config.json` `eos_token_id` (an id or a list) and the tokenizer's EOS."""
    stops = list(family.stop)
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in generation_eos_ids(model_dir)] + [tokenizer.eos_token]
    for token in tokens:
        if token and token not in stops:
            stops.append(token)
    return stops


@dataclass
class Row:
    """One conversation as one consumer builds it, compared with training."""

    conversation: str
    consumer: str  # training | vllm | gguf | ollama
    status: str = ""  # reference | same | differs | refused
    detail: str = ""
    tokens: int = 0


def _load_tokenizer(model: Path):
    from transformers import AutoTokenizer

    if not Path(model).is_dir():
        raise InputError(f"{model}: no such model folder", hint="ftpipe check-template --model outputs/<run>/merged")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise InputError(f"{model}: cannot load a tokenizer ({str(exc).splitlines()[0]})",
                         hint="point --model at a model folder with tokenizer files (outputs/<run>/merged)") from None
    if not tokenizer.chat_template:
        raise InputError(f"{model}: the tokenizer has no chat template, so there is nothing to compare",
                         hint="set a chat template (chat_template.jinja) and rerun ftpipe check-template")
    return tokenizer


def gguf_bos_text(tokenizer, model: Path) -> str | None:
    """The BOS text that a GGUF runtime (llama.cpp, Ollama) adds as a token for this model, so the
    Ollama templates of chat_families leave it out; None when the GGUF adds no BOS (SmolLM2: its BOS
    `<|im_start|>` is written by the template itself, and must stay in the text Ollama renders)."""
    if tokenizer_adds_bos(tokenizer) or _converter_forces_bos(Path(model)):
        return tokenizer.bos_token
    return None


def _converter_forces_bos(model: Path) -> bool:
    """llama.cpp's Gemma 4 converter writes add_bos_token=true whatever the tokenizer says
    (conversion/gemma.py, Gemma4Model.set_vocab)."""
    try:
        model_type = json.loads((model / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return False
    return model_type in ("gemma4", "gemma4_text")


def _compare(row: Row, text: str, ids: list[int], ref_text: str, ref_ids: list[int], bos_id: int | None) -> Row:
    row.tokens = len(ids)
    at = first_difference(text, ref_text)
    if at is not None:
        row.status, row.detail = "differs", f"differs at char {at}: {_excerpt(text, ref_text, at)}"
        return row
    at = first_difference(ids, ref_ids)
    if at is not None:
        double = bos_id is not None and ids[:2] == [bos_id, bos_id]
        row.status = "differs"
        row.detail = f"differs at token {at}: {ids[at:at + 3]} vs {ref_ids[at:at + 3]}" + (" (double BOS)" if double else "")
        return row
    row.status, row.detail = "same", ""
    return row


def check(model: Path) -> dict[str, Any]:
    """Render the probe conversations as every consumer would and compare them with training.

    Returns:
        {"model", "family" (Ollama family or None), "family_error", "adds_bos", "rows": [Row...],
        "agree": bool} (`agree`: no row differs).

    Raises:
        InputError: no model folder, no tokenizer, no chat template.
    """
    tokenizer = _load_tokenizer(model)
    render_hf = tokenizer_renderer(tokenizer)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    adds_bos = tokenizer_adds_bos(tokenizer)
    gguf_bos = adds_bos or _converter_forces_bos(Path(model))
    where = str(Path(model) / "chat_template.jinja")
    family, family_error = None, None
    try:
        family = choose_family(render_hf, tokenizer.chat_template, bos if gguf_bos else None, where)
    except InputError as exc:
        family_error = exc.one_line()
    conversations: dict[str, tuple[list, list | None]] = {n: (m, None) for n, m in PROBES.items()}
    if tool_support(tokenizer)["tools"]:
        conversations["tools"] = (TOOL_PROBE, TOOLS)
    else:
        log.info("no tools conversation: the HF template does not render tool definitions")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows: list[Row] = []
    for name, (messages, tools) in conversations.items():
        try:
            text = render_hf(messages, tools)
        except Exception as exc:  # the template refuses this conversation: every consumer does
            rows.append(Row(name, "training", "refused", f"the HF template refuses it: {exc}"))
            continue
        ids = encode(text)
        rows.append(Row(name, "training", "reference", "", len(ids)))
        rows.append(_compare(Row(name, "vllm"), text, encode(text), text, ids, bos_id))
        # llama.cpp's chat code drops a BOS the template wrote when the GGUF adds one itself
        # (common/chat.cpp), then tokenizes with BOS added.
        stripped = text[len(bos):] if gguf_bos and bos and text.startswith(bos) else text
        gguf_ids = ([bos_id] if gguf_bos else []) + encode(stripped)
        rows.append(_compare(Row(name, "gguf"), text, gguf_ids, text, ids, bos_id))
        if family is None:
            rows.append(Row(name, "ollama", "differs", family_error or ""))
            continue
        if tools:
            rows.append(Row(name, "ollama", "refused", f"{family.name}: no tools in Ollama ({family.tools})"))
            continue
        go_text = render(family.template, ollama_values(messages))
        ref_text = text[len(bos):] if gguf_bos and bos and text.startswith(bos) else text
        ollama_ids = ([bos_id] if gguf_bos else []) + encode(go_text)
        row = _compare(Row(name, "ollama"), go_text, ollama_ids, ref_text, ids, bos_id)
        if row.detail.startswith("differs at char"):
            row.detail += " (BOS aside)"
        rows.append(row)
    return {
        "model": str(model),
        "family": family.name if family else None,
        "family_error": family_error,
        "adds_bos": adds_bos,
        "rows": [asdict(r) for r in rows],
        "agree": not any(r.status == "differs" for r in rows),
    }
