"""The Ollama Go template chosen for each known family renders the HF template's exact text.

Two sets of HF templates: the older ones embedded below (the model's real `chat_template`, tool
branches included), and the six families of `make-tiny-model --family` (real tokenizers and
templates, built by the `family_model` fixture). The Go side is rendered with ftpipe's
renderer of the Go text/template subset the templates use (`ftpipe.export.gotemplate`), over the
values Ollama passes (`.Messages` incl. system messages, `.System`). BOS is emitted as text by the
HF templates and added by Ollama's tokenizer, so it is stripped from the HF text before comparing.
"""

from __future__ import annotations

import json
import re

import pytest

from ftpipe.core.errors import InputError
from ftpipe.export.chat_families import FAMILIES, candidates, detect_family
from ftpipe.export.gotemplate import go_json, ollama_values, render
from ftpipe.export.template_check import PROBES, TOOL_PROBE, TOOLS, choose_family, hf_renderer, stop_strings
from ftpipe.training.tiny_model import CHAT_TEMPLATE as TINY_CHATML

# Qwen/Qwen2.5-0.5B-Instruct
QWEN25 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# google/gemma-3-1b-it
GEMMA3 = r'''{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
'''

# mistralai/Mistral-7B-Instruct-v0.3
MISTRAL = r'''{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
'''

# microsoft/Phi-3.5-mini-instruct
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

CASES = {
    "qwen2.5": (QWEN25, "", "<|im_end|>"),
    "chatml-tiny": (TINY_CHATML, "", "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA3, "<bos>", "<eos>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "phi3": (PHI3, "", "<|endoftext|>"),  # BOS comes from the tokenizer, not the template
}

# make-tiny-model --family NAME -> the Ollama family its template renders as.
TINY_FAMILIES = {"llama3": "llama3.1", "qwen2.5": "qwen2.5", "qwen3": "chatml", "phi3.5": "phi3",
                 "mistral": "mistral-nemo", "gemma": "gemma4"}
# Building the tiny Gemma 4 (262k vocabulary) takes about a minute on a busy CPU.
TINY_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "gemma" else n for n in sorted(TINY_FAMILIES)]


def _renderer(template: str, bos: str, eos: str):
    return hf_renderer(template, {"bos_token": bos, "eos_token": eos})


def _strip_bos(text: str, bos: str) -> str:
    assert not bos or text.startswith(bos), "the HF template should start with BOS"
    return text[len(bos):]


@pytest.mark.parametrize("case", sorted(CASES))
def test_embedded_templates_choose_their_family_by_rendering(case):
    template, bos, eos = CASES[case]
    family = choose_family(_renderer(template, bos, eos), template, bos, case)
    assert family.name == case.replace("chatml-tiny", "chatml")
    for name, messages in PROBES.items():
        expected = _strip_bos(_renderer(template, bos, eos)(messages, None), bos)
        assert render(family.template, ollama_values(messages)) == expected, name
    # Every stop string is a turn marker that appears in the rendered prompt or template, or is the EOS text.
    assert all(s in template or s == eos for s in family.stop)


# HuggingFaceTB/SmolLM2-135M-Instruct (as its GGUF ships it): ChatML with a default system prompt. Its
# BOS token is `<|im_start|>`, which the template writes itself; its GGUF adds no BOS.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_keeps_its_default_system_prompt_and_its_bos_text():
    """SmolLM2's BOS token is `<|im_start|>`: a GGUF that adds no BOS (gguf_bos_text -> None) must
    get the whole text from Ollama, default system prompt included. Stripping the BOS text as if
    Ollama added it (what ollama-load did before) matched no family: qwen2.5's system prompt is
    Qwen's, chatml has none."""
    render_hf = _renderer(SMOLLM2, "<|im_start|>", "<|im_end|>")
    family = choose_family(render_hf, SMOLLM2, None, "smollm2")
    assert family.name == "smollm2"
    for name, messages in PROBES.items():
        assert render(family.template, ollama_values(messages)) == render_hf(messages, None), name
    assert "named SmolLM" in render(family.template, ollama_values(PROBES["no-system"]))
    with pytest.raises(InputError, match="smollm2 Ollama template renders the no-system conversation differently"):
        choose_family(render_hf, SMOLLM2, "<|im_start|>", "smollm2")


@pytest.mark.parametrize("name", TINY_PARAMS)
def test_tiny_family_templates_render_exactly(family_model, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_model(name))
    render_hf = hf_renderer(tok.chat_template, dict(tok.special_tokens_map))
    family = choose_family(render_hf, tok.chat_template, tok.bos_token, name)
    assert family.name == TINY_FAMILIES[name]
    for probe, messages in PROBES.items():
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if tok.bos_token and expected.startswith(tok.bos_token):
            expected = expected[len(tok.bos_token):]
        assert render(family.template, ollama_values(messages)) == expected, probe
    # Stops: the turn markers plus every end-of-turn token of generation_config.json.
    stops = stop_strings(family, tok, family_model(name))
    gen = json.loads((family_model(name) / "generation_config.json").read_text())["eos_token_id"]
    assert set(tok.convert_ids_to_tokens(gen)) <= set(stops)
    assert set(family.stop) <= set(stops)
    # The family's template has a tool format (all but Phi-3.5), yet Ollama gets none: refused, with a reason.
    assert "{{" in family.template and ".Tools" not in family.template and family.tools
    if name != "phi3.5":
        assert "get_weather" in tok.apply_chat_template(TOOL_PROBE, tools=TOOLS, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", TINY_PARAMS)
def test_mutated_hf_template_is_refused_with_the_first_difference(family_model, name):
    """One character more in the HF template's generation prompt: no family renders it; the
    error names the closest family and the character where the texts part."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_model(name))
    mutated = tok.chat_template.replace("<|im_start|>' + message.role + '\\n'", "<|im_start|>' + message.role + ':\\n'")
    for old, new in (("<|end_header_id|>\\n\\n'+ message['content']", "<|end_header_id|>\\n'+ message['content']"),
                     ("{{'<|user|>\n' + message['content']", "{{'<|user|>\n\n' + message['content']"),
                     ('"[INST]" + message["content"]', '"[INST] " + message["content"]'),
                     ("{{- '<|turn>' + role + '\\n' }}", "{{- '<|turn>' + role + '\\n\\n' }}")):
        mutated = mutated.replace(old, new)
    assert mutated != tok.chat_template, "the mutation must change the template"
    render_hf = hf_renderer(mutated, dict(tok.special_tokens_map))
    with pytest.raises(InputError, match=rf"^x/chat_template.jinja: the ({TINY_FAMILIES[name]}|chatml|qwen2.5) Ollama "
                       r"template renders the [\w-]+ conversation differently from the model's chat template at character \d+: "):
        choose_family(render_hf, mutated, tok.bos_token, "x/chat_template.jinja")


def test_mutated_go_template_is_caught():
    """A Go template one character off renders differently, so it is never chosen."""
    import dataclasses

    from ftpipe.export import chat_families

    template, bos, eos = CASES["qwen2.5"]
    broken = dataclasses.replace(chat_families.QWEN25, template=chat_families.QWEN25.template.replace("{{ .Content }}", "{{ .Content }} "))
    original = chat_families.FAMILIES
    try:
        chat_families.FAMILIES = tuple(broken if f.name == "qwen2.5" else f for f in original)
        with pytest.raises(InputError, match=r"the qwen2.5 Ollama template renders the no-system conversation differently .* at character 131: ' <\|im_end"):
            choose_family(_renderer(template, bos, eos), template, bos, "q")
    finally:
        chat_families.FAMILIES = original


def test_ollama_collates_like_ollama():
    values = ollama_values([
        {"role": "system", "content": "A"}, {"role": "system", "content": "B"},
        {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"},
        {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"},
    ])
    assert values["System"] == "A\n\nB"
    assert [(m["Role"], m["Content"]) for m in values["Messages"]] == [
        ("system", "A\n\nB"), ("user", "u1\n\nu2"), ("tool", "t1"), ("tool", "t2")]


def test_tool_json_cannot_match_python_tojson():
    """Why tools are refused: Go's encoding/json (Ollama's `json`, and `.Function.Arguments`
    printed) is not Python's json.dumps that the HF templates use."""
    args = {"city": "Paris <FR>", "days": 2}
    hf = json.dumps(args)
    assert hf == '{"city": "Paris <FR>", "days": 2}'
    assert go_json(args) == '{"city":"Paris \\u003cFR\\u003e","days":2}'
    values = ollama_values(TOOL_PROBE, TOOLS)
    call = values["Messages"][1]["ToolCalls"][0]["Function"]
    assert render("{{ .Name }} {{ .Arguments }}", call) == 'get_weather {"city":"Paris"}'
    assert render("{{ range .Tools }}{{ json .Function.Parameters }}{{ end }}", values).startswith('{"properties":{"city":')


def test_unknown_family_is_refused():
    known = ", ".join(f.name for f in FAMILIES)
    with pytest.raises(InputError, match=rf"not one of the known families \({re.escape(known)}\)"):
        candidates("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "x/chat_template.jinja")


def test_missing_template_is_refused():
    with pytest.raises(InputError, match="no chat template"):
        detect_family(None, "x")


def test_renderer_subset():
    assert render('{{ if eq .A "x" }}1{{ else if .B }}2{{ else }}3{{ end }}', {"A": "y", "B": ""}) == "3"
    assert render("a  {{- .A -}}  b", {"A": "!"}) == "a!b"
    assert render('{{ range $i, $m := .L }}{{ $i }}{{ $m }}{{ end }}', {"L": ["a", "b"]}) == "0a1b"
    assert render("{{ .Missing }}", {}) == "<no value>"  # Go prints a missing map key so
    assert render("{{ if .Missing }}x{{ else }}y{{ end }}", {}) == "y"
    with pytest.raises(ValueError, match="can't evaluate field Nope"):
        render("{{ range .Messages }}{{ .Nope }}{{ end }}", ollama_values([{"role": "user", "content": "x"}]))
    with pytest.raises(ValueError):
        render("{{ template \"x\" }}", {})
