"""Ollama (Go) chat templates and stop strings for the chat-template families ftpipe knows.

Ollama does not run a model's Jinja chat template: a model created without an explicit
`template` gets a guessed one (or none: "does not support chat"). `ollama-load` therefore sends a
Go template written to render exactly the text of the HF template, plus `stop` strings for the
turn markers and every end-of-turn token. The family is chosen by rendering
(`ftpipe.export.template_check.choose_family`): the one whose Go template renders every probe
conversation exactly as the HF template does. The markers below only name candidates in errors.

BOS is not in these templates: Ollama's tokenizer adds it (GGUF `tokenizer.ggml.add_bos_token`),
where the HF template writes it as text.

Tools: no family here passes tools to Ollama. Every template that has a tool format writes JSON
with Python's `json.dumps` (", " and ": " separators, keys in insertion order, `<` kept), while a Go
template can only produce JSON through Ollama's `json` / `String()` (Go `encoding/json`: no spaces,
keys sorted, `<>&` escaped); Gemma 4's format needs recursive, upper-casing formatters Ollama's
template functions lack. The templates therefore do not mention `.Tools`, so Ollama answers a chat
request with tools "does not support tools" instead of building a prompt the model was not
trained on. `ChatFamily.tools` says why, per family.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftpipe.core.errors import InputError

_JSON_TOOLS = ("the HF template writes tools and tool calls with Python json.dumps; Ollama's Go templates can only "
               "write Go encoding/json (no spaces, sorted keys, <>& escaped)")
_NO_TOOLS = "the HF template has no tool format"


@dataclass(frozen=True)
class ChatFamily:
    """One chat format: its Ollama template, its turn markers (stops), why tools are refused."""

    name: str
    markers: tuple[str, ...]  # all occur in the HF chat template of this family
    template: str
    stop: tuple[str, ...]  # the turn markers; end-of-turn tokens of the model are added to these
    tools: str  # why Ollama gets no tool support for this family
    models: str = ""  # released models whose template this is


_CHATML_TURNS = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

# ChatML (Qwen3 without thinking history, SmolLM, ftpipe's tiny model): every message is one turn.
CHATML = ChatFamily(
    "chatml", ("<|im_start|>", "<|im_end|>"), _CHATML_TURNS, ("<|im_start|>", "<|im_end|>"),
    _JSON_TOOLS, "Qwen3, ftpipe's tiny model",
)

# Qwen2.5: ChatML, and its default system prompt when the conversation has none.
QWEN25 = ChatFamily(
    "qwen2.5", ("<|im_start|>", "<|im_end|>"),
    "{{- $first := index .Messages 0 }}"
    "{{- if ne $first.Role \"system\" }}<|im_start|>system\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "{{ end }}" + _CHATML_TURNS,
    ("<|im_start|>", "<|im_end|>"), _JSON_TOOLS, "Qwen2.5-Instruct",
)

# SmolLM2-Instruct: ChatML, and SmolLM's default system prompt when the conversation has none.
SMOLLM2 = ChatFamily(
    "smollm2", ("<|im_start|>", "<|im_end|>", "named SmolLM"),
    "{{- $first := index .Messages 0 }}"
    "{{- if ne $first.Role \"system\" }}<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "{{ end }}" + _CHATML_TURNS,
    ("<|im_start|>", "<|im_end|>"), _NO_TOOLS, "SmolLM2-135M/360M/1.7B-Instruct",
)

# Llama 3 (no tools): header per message, <|eot_id|> closes it.
LLAMA3 = ChatFamily(
    "llama3", ("<|start_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _NO_TOOLS, "Meta-Llama-3-Instruct",
)

# Llama 3.1 / 3.3: a system turn always, with the knowledge-date header, then the first system
# message's text; the other messages as in Llama 3.
LLAMA31 = ChatFamily(
    "llama3.1", ("<|start_header_id|>", "<|eot_id|>", "Cutting Knowledge Date"),
    "{{- $first := index .Messages 0 }}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "{{ if eq $first.Role \"system\" }}{{ $first.Content }}{{ end }}<|eot_id|>"
    "{{- range $i, $m := .Messages }}{{ if or (ne $i 0) (ne $m.Role \"system\") }}"
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>"
    "{{- end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"), _JSON_TOOLS,
    "Llama-3.1-8B-Instruct, Llama-3.3-70B-Instruct",
)

# Gemma 2/3: roles user/model; a leading system message opens the first user turn (Gemma 3
# template; HF only looks at messages[0], so the first user turn is then message 1).
GEMMA = ChatFamily(
    "gemma", ("<start_of_turn>", "<end_of_turn>"),
    "{{- range $i, $_ := .Messages }}"
    "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
    "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n"
    "{{ .Content }}<end_of_turn>\n"
    "{{ end }}"
    "{{- end }}<start_of_turn>model\n",
    ("<start_of_turn>", "<end_of_turn>"), _NO_TOOLS, "gemma-2-it, gemma-3-it",
)

# Gemma 4: <|turn>role ... <turn|>; the system message is a turn of its own; the generation prompt
# opens an empty thought channel (thinking off, the template's default).
GEMMA4 = ChatFamily(
    "gemma4", ("<|turn>", "<turn|>"),
    "{{- range .Messages }}{{ if ne .Role \"tool\" }}"
    "<|turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
    "{{ .Content }}<turn|>\n"
    "{{ end }}{{ end }}<|turn>model\n<|channel>thought\n<channel|>",
    ("<|turn>", "<turn|>"),
    "Gemma 4's tool declarations and calls need recursive formatting with sorted keys and upper-cased "
    "types, which Ollama's template functions cannot express faithfully", "gemma-4-31B-it",
)

def _inst_template(space: str) -> str:
    """Mistral's [INST] turns: the system text is prepended to the *last* user message; `space`
    follows [INST] and precedes the answer (" " in v0.3, "" in Nemo)."""
    return (
        "{{- range $i, $_ := .Messages }}"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{- if eq .Role \"user\" }}[INST]" + space + "{{ if and $last $.System }}{{ $.System }}\n\n{{ end }}"
        "{{ .Content }}[/INST]"
        "{{- else if eq .Role \"assistant\" }}" + space + "{{ .Content }}</s>"
        "{{- end }}"
        "{{- end }}"
    )


MISTRAL = ChatFamily(
    "mistral", ("[INST]", "[/INST]"), _inst_template(" "),
    ("[INST]", "[/INST]", "</s>"), _JSON_TOOLS, "Mistral-7B-Instruct-v0.3",
)

MISTRAL_NEMO = ChatFamily(
    "mistral-nemo", ("[INST]", "[/INST]"), _inst_template(""),
    ("[INST]", "[/INST]", "</s>"), _JSON_TOOLS, "Mistral-Nemo-Instruct-2407",
)

# Phi-3 / Phi-3.5: <|role|> header, <|end|> closes every message; an empty system message is dropped.
PHI3 = ChatFamily(
    "phi3", ("<|user|>", "<|end|>", "<|assistant|>"),
    "{{- range .Messages }}"
    "{{- if or (eq .Role \"user\") (eq .Role \"assistant\") (and (eq .Role \"system\") .Content) }}<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ end }}{{ end }}<|assistant|>\n",
    ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"), _NO_TOOLS,
    "Phi-3-mini-instruct, Phi-3.5-mini-instruct",
)

FAMILIES: tuple[ChatFamily, ...] = (LLAMA31, LLAMA3, GEMMA4, GEMMA, PHI3, MISTRAL_NEMO, MISTRAL, SMOLLM2, QWEN25, CHATML)


def candidates(chat_template: str | None, where: str) -> list[ChatFamily]:
    """The families whose markers all occur in `chat_template` (the ones worth rendering).

    Raises:
        InputError: no template, or none of the known families' markers (naming the known ones).
    """
    if not chat_template:
        raise InputError(f"{where}: no chat template, so no Ollama template can be derived",
                         hint="set a chat template on the tokenizer and rerun ftpipe export-merged")
    found = [f for f in FAMILIES if all(marker in chat_template for marker in f.markers)]
    if not found:
        known = ", ".join(f.name for f in FAMILIES)
        raise InputError(
            f"{where}: the chat template is not one of the known families ({known}); "
            "ftpipe will not guess an Ollama template for it",
            hint="write the Go template by hand (ollama create with a Modelfile TEMPLATE) or add the family "
            "to ftpipe/export/chat_families.py",
        )
    return found


def detect_family(chat_template: str | None, where: str) -> ChatFamily:
    """The first candidate family by markers (no rendering; `template_check.choose_family` renders).

    Raises:
        InputError: as `candidates`.
    """
    return candidates(chat_template, where)[0]
