"""A minimal renderer for the Go `text/template` subset that ftpipe's Ollama templates use.

Ollama renders a model's `template` with Go's text/template over `.Messages` (each with `.Role`,
`.Content`, `.Thinking`, `.ToolCalls`, `.ToolName`, `.ToolCallID`), `.System` and `.Tools`. `ollama-load` renders the template it is about to send with this
renderer and compares the text with the model's HF chat template before creating the model, so a
template that would change the prompt is caught here rather than in answers.

Supported: text; `{{- ... -}}` whitespace trimming; `{{ pipeline }}`; `{{ $x := pipeline }}`;
`{{ if }}` / `{{ else if }}` / `{{ else }}` / `{{ end }}`; `{{ range pipeline }}` and
`{{ range $i, $v := pipeline }}`; fields (`.Role`, `$.System`, `$v.Content`), variables, string
and integer literals, parentheses; functions `eq ne lt le gt ge and or not len slice index` and
Ollama's `json` (Go `encoding/json`: compact, map keys sorted, `<>&` escaped). Messages, tool
calls and tools are structs in Ollama: a field they lack is an error here as in Go; a key missing
from the top-level map prints `<no value>` as Go does. Anything else raises `ValueError` (fail
loudly rather than render something else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:\\.|[^"\\])*"|\(|\)|:=|,|[^\s(),]+)')


@dataclass
class _Node:
    kind: str  # text | out | assign | if | range
    value: Any = None
    branches: list = field(default_factory=list)  # if: [(cond, body)], range: body in value
    else_body: list = field(default_factory=list)


def _lex(template: str) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = template[pos:]
    items.append(("text", text.lstrip(" \t\r\n") if trim_next else text))
    return [i for i in items if i != ("text", "")]


def _tokens(expr: str) -> list[str]:
    return [t for t in _TOKEN.findall(expr) if t]


def _parse(items: list[tuple[str, str]], pos: int, stop: tuple[str, ...]) -> tuple[list[_Node], int, str]:
    body: list[_Node] = []
    while pos < len(items):
        kind, text = items[pos]
        pos += 1
        if kind == "text":
            body.append(_Node("text", text))
            continue
        word = text.split(None, 1)[0] if text else ""
        if word in stop:
            return body, pos, text
        if word == "if":
            node = _Node("if")
            cond = text[2:].strip()
            while True:
                branch, pos, closer = _parse(items, pos, ("end", "else"))
                node.branches.append((cond, branch))
                if closer == "end":
                    break
                if closer.startswith("else if"):
                    cond = closer[len("else if"):].strip()
                    continue
                node.else_body, pos, closer = _parse(items, pos, ("end",))
                break
            body.append(node)
        elif word == "range":
            spec = text[5:].strip()
            names: list[str] = []
            if ":=" in spec:
                lhs, spec = spec.split(":=", 1)
                names = [n.strip() for n in lhs.split(",")]
            inner, pos, closer = _parse(items, pos, ("end",))
            if closer != "end":
                raise ValueError("range without end")
            body.append(_Node("range", (names, spec.strip(), inner)))
        elif re.match(r"^\$\w+\s*:?=", text):
            name, expr = re.split(r"\s*:?=\s*", text, maxsplit=1)
            body.append(_Node("assign", (name, expr)))
        elif word in ("end", "else"):
            raise ValueError(f"unexpected {{{{ {text} }}}}")
        elif word in ("define", "template", "block", "with", "break", "continue"):
            raise ValueError(f"unsupported action {{{{ {text} }}}}")
        else:
            body.append(_Node("out", text))
    if stop:
        raise ValueError(f"missing {{{{ end }}}} (expected one of {stop})")
    return body, pos, ""


def _truthy(v: Any) -> bool:
    return not (v is None or v is NO_VALUE or v is False or v == 0 or v == "" or (hasattr(v, "__len__") and len(v) == 0))


class GoStruct(dict):
    """A Go struct value: only its fields exist (Go refuses `.Unknown` on a struct at execution)."""


class GoJSON(dict):
    """A map whose Go type has a `String()` method that marshals it to JSON (Ollama's
    `ToolCallFunctionArguments`, `ToolProperty`...): `{{ .Function.Arguments }}` prints JSON."""

    def __str__(self) -> str:
        return go_json(dict(self))


class _NoValue:
    def __str__(self) -> str:
        return "<no value>"

    def __bool__(self) -> bool:
        return False


NO_VALUE = _NoValue()


def go_json(value: Any) -> str:
    """`json.Marshal` as Go writes it: no spaces, map keys sorted, `<`, `>`, `&`, U+2028/9 escaped,
    integral floats without a fraction."""
    if value is None or value is NO_VALUE:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        import json

        text = json.dumps(value, ensure_ascii=False)
        for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            text = text.replace(raw, esc)
        return text
    if isinstance(value, GoStruct):
        # A struct marshals in field order with its own json tags: not reproduced here.
        raise ValueError("json of an Ollama struct (a message, tool or tool call) is not supported")
    if isinstance(value, dict):
        return "{" + ",".join(f"{go_json(str(k))}:{go_json(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise ValueError(f"json: unsupported value of type {type(value).__name__}")


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, GoStruct):
        if name not in obj:
            raise ValueError(f"can't evaluate field {name} in a struct with fields {sorted(obj)}")
        return obj[name]
    if obj is None or obj is NO_VALUE:
        raise ValueError(f"nil pointer evaluating .{name}")
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        return obj.get(name, NO_VALUE)
    raise ValueError(f"can't evaluate field {name} in type {type(obj).__name__}")


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "not": lambda a: not _truthy(a),
    "len": lambda a: len(a),
    "slice": lambda a, *ix: a[ix[0]: ix[1]] if len(ix) > 1 else a[ix[0]:] if ix else a,
    "index": lambda a, *ix: a[ix[0]] if len(ix) == 1 else _FUNCS["index"](a[ix[0]], *ix[1:]),
    "json": go_json,
}


class _Eval:
    def __init__(self, root: Any):
        self.root = root

    def expr(self, text: str, dot: Any, vars_: dict) -> Any:
        tokens = _tokens(text)
        value, rest = self._command(tokens, dot, vars_)
        if rest:
            raise ValueError(f"cannot parse {text!r}")
        return value

    def _command(self, tokens: list[str], dot: Any, vars_: dict) -> tuple[Any, list[str]]:
        if not tokens:
            raise ValueError("empty pipeline")
        head = tokens[0]
        if head in ("and", "or"):
            args, rest = self._args(tokens[1:], dot, vars_)
            result = args[0]
            for a in args:
                result = a
                if _truthy(a) != (head == "and"):
                    break
            return result, rest
        if head in _FUNCS:
            args, rest = self._args(tokens[1:], dot, vars_)
            return _FUNCS[head](*args), rest
        value, rest = self._operand(tokens, dot, vars_)
        return value, rest

    def _args(self, tokens: list[str], dot: Any, vars_: dict) -> tuple[list[Any], list[str]]:
        args = []
        while tokens and tokens[0] != ")":
            value, tokens = self._operand(tokens, dot, vars_)
            args.append(value)
        return args, tokens

    def _operand(self, tokens: list[str], dot: Any, vars_: dict) -> tuple[Any, list[str]]:
        tok, rest = tokens[0], tokens[1:]
        if tok == "(":
            value, rest = self._command(rest, dot, vars_)
            if not rest or rest[0] != ")":
                raise ValueError("unbalanced parentheses")
            return value, rest[1:]
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape"), rest
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), rest
        if tok in ("true", "false"):
            return tok == "true", rest
        if tok == ".":
            return dot, rest
        if tok.startswith("."):
            base, path = dot, tok[1:]
        elif tok.startswith("$"):
            name, _, path = tok.partition(".")
            if name == "$":
                base = self.root
            elif name in vars_:
                base = vars_[name]
            else:
                raise ValueError(f"undefined variable {name}")
        else:
            raise ValueError(f"unsupported token {tok!r}")
        for part in filter(None, path.split(".")):
            base = _field(base, part)
        return base, rest

    def run(self, nodes: list[_Node], dot: Any, vars_: dict, out: list[str]) -> None:
        for node in nodes:
            if node.kind == "text":
                out.append(node.value)
            elif node.kind == "out":
                value = self.expr(node.value, dot, vars_)
                out.append(_go_print(value))
            elif node.kind == "assign":
                name, expr = node.value
                vars_[name] = self.expr(expr, dot, vars_)
            elif node.kind == "if":
                for cond, body in node.branches:
                    if _truthy(self.expr(cond, dot, vars_)):
                        self.run(body, dot, vars_, out)
                        break
                else:
                    self.run(node.else_body, dot, vars_, out)
            elif node.kind == "range":
                names, expr, body = node.value
                items = self.expr(expr, dot, vars_) or []
                for i, item in enumerate(items):
                    scope = dict(vars_)
                    if len(names) == 2:
                        scope[names[0]], scope[names[1]] = i, item
                    elif len(names) == 1:
                        scope[names[0]] = item
                    self.run(body, item, scope, out)


def _go_print(value: Any) -> str:
    """What `{{ value }}` prints: Go's fmt for the values templates see."""
    if value is None:
        return "<nil>"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)) and not isinstance(value, GoJSON):
        raise ValueError(f"printing a {type(value).__name__} is not supported (Go prints its own syntax)")
    return str(value)


def render(template: str, data: dict[str, Any]) -> str:
    """Render `template` with `data` as `.` (and `$`).

    Raises:
        ValueError: syntax outside the supported subset.
    """
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _Eval(data).run(nodes, data, {"$": data}, out)
    return "".join(out)


def ollama_values(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The values Ollama passes to a chat template (`template.Execute` with `collate`).

    `.System` is every system message's text joined by a blank line; `.Messages` keeps system
    messages and merges consecutive messages of the same role (tool messages excepted) with a blank
    line, as Ollama's `collate` does; `.Tools` are the request's tools.
    """
    system = "\n\n".join(m.get("content") or "" for m in messages if m["role"] == "system")
    collated: list[GoStruct] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + (m.get("content") or "")
            continue
        collated.append(GoStruct(
            Role=m["role"], Content=m.get("content") or "", Thinking=m.get("reasoning_content") or "",
            ToolCalls=[_tool_call(c) for c in m.get("tool_calls") or []],
            ToolName=m.get("name") or "", ToolCallID=m.get("tool_call_id") or "", Images=[],
        ))
    return {
        "Messages": collated,
        "System": system,
        "Tools": [_tool(t) for t in tools or []],
        "Prompt": "",
        "Response": "",
    }


def _tool_call(call: dict[str, Any]) -> GoStruct:
    fn = call.get("function", call)
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        import json

        args = json.loads(args)
    return GoStruct(ID=call.get("id") or "", Function=GoStruct(Index=0, Name=fn["name"], Arguments=GoJSON(args)))


def _tool(tool: dict[str, Any]) -> GoStruct:
    fn = tool.get("function", {})
    return GoStruct(Type=tool.get("type", "function"), Function=GoStruct(
        Name=fn.get("name", ""), Description=fn.get("description", ""), Parameters=GoJSON(fn.get("parameters") or {}),
    ))
