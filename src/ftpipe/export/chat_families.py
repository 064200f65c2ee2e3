"""Ollama (Go) chat templates and stop strings for the chat-template families ftpipe knows.

Ollama does not run a model's Jinja chat template: a model created without an explicit
`template` gets a guessed one (or none: "does not support chat"). `ollama-load` therefore sends a
Go template written to render exactly the text of the HF template, plus `stop` strings for the
turn markers. The family is recognised from the HF template's markers; anything else is refused.

BOS is not in these templates: Ollama's tokenizer adds it (GGUF `tokenizer.ggml.add_bos_token`),
where the HF template writes it as text. `ftpipe.export.gotemplate` renders these templates to
check them against the HF template (tests and `ollama-load` itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from ftpipe.core.errors import InputError


@dataclass(frozen=True)
class ChatFamily:
    """One chat format: how to recognise it, its Ollama template and stop strings."""

    name: str
    markers: tuple[str, ...]  # all must occur in the HF chat template
    template: str
    stop: tuple[str, ...]


# ChatML (Qwen, SmolLM, ftpipe's tiny model): every message, system included, is one turn.
CHATML = ChatFamily(
    "chatml",
    ("<|im_start|>", "<|im_end|>"),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n",
    ("<|im_start|>", "<|im_end|>"),
)

# Llama 3 / 3.1 / 3.2 (no tools): header per message, <|eot_id|> closes it.
LLAMA3 = ChatFamily(
    "llama3",
    ("<|start_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# Gemma 2/3: roles user/model; a leading system message opens the first user turn (Gemma 3
# template; HF only looks at messages[0], so the first user turn is then message 1).
GEMMA = ChatFamily(
    "gemma",
    ("<start_of_turn>", "<end_of_turn>"),
    "{{- range $i, $_ := .Messages }}"
    "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
    "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n"
    "{{ .Content }}<end_of_turn>\n"
    "{{ end }}"
    "{{- end }}<start_of_turn>model\n",
    ("<start_of_turn>", "<end_of_turn>"),
)

# Mistral v0.3-style [INST]: the system text is prepended to the *last* user message.
MISTRAL = ChatFamily(
    "mistral",
    ("[INST]", "[/INST]"),
    "{{- range $i, $_ := .Messages }}"
    "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
    "{{- if eq .Role \"user\" }}[INST] {{ if and $last $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
    "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>"
    "{{- end }}"
    "{{- end }}",
    ("[INST]", "[/INST]", "</s>"),
)

# Phi-3 / Phi-3.5: <|role|> header, <|end|> closes every message.
PHI3 = ChatFamily(
    "phi3",
    ("<|user|>", "<|end|>", "<|assistant|>"),
    "{{- range .Messages }}<|{{ .Role }}|>\n"
    "{{ .Content }}<|end|>\n"
    "{{ end }}<|assistant|>\n",
    ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
)

FAMILIES: tuple[ChatFamily, ...] = (LLAMA3, GEMMA, PHI3, MISTRAL, CHATML)


def detect_family(chat_template: str | None, where: str) -> ChatFamily:
    """The family whose markers all occur in `chat_template`.

    Raises:
        InputError: no template, or one of an unknown family (naming the known ones).
    """
    if not chat_template:
        raise InputError(f"{where}: no chat template, so no Ollama template can be derived",
                         hint="set a chat template on the tokenizer and rerun ftpipe export-merged")
    for family in FAMILIES:
        if all(marker in chat_template for marker in family.markers):
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise InputError(
        f"{where}: the chat template is not one of the known families ({known}); "
        "ftpipe will not guess an Ollama template for it",
        hint="write the Go template by hand (ollama create with a Modelfile TEMPLATE) or add the family "
        "to ftpipe/export/chat_families.py",
    )
