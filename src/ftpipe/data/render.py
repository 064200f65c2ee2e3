"""Token counting with the model's chat template, fast enough for millions of rows.

Part of `preprocess-sft`. The tokenizer comes from the `model` config section
(`ftpipe.core.model_ref.resolve_model`), loaded with AutoTokenizer (`model.trust_remote_code`), or
from the tokenizer cache on later runs (ftpipe/data/tokenizer_cache.py).
Rendering every row through Jinja and encoding the whole text dominates the cost, so by default:

1. each conversation *shape* (its sequence of roles) is rendered once with sentinel contents and
   split into a skeleton; a row of that shape is the skeleton's pieces joined with its contents.
   A shape uses its skeleton only when the Jinja rendering of its first rows matches exactly, and
   every `VERIFY_EVERY`-th row is checked again;
2. when the tokenizer splits at the piece/content boundaries (checked the same way against the
   full encoding), a row's count is the shape's piece tokens plus each content's tokens, and
   repeated contents (system prompts, labels) are encoded once.

Rows with tool calls or tool definitions under a chat template that does not render them (Phi-3.5:
the assistant turn would train as an empty answer) are row errors (`ToolsNotRendered`), found by
rendering a probe once per tokenizer (`ftpipe.handoff.chat_template.tool_support`); with
`preprocess.tools_fallback: text` they are rewritten by `tools_as_text` instead (tools and calls as
JSON text in the turns, which every template renders). Rows with tool calls or tool definitions, rows whose content holds one of the template's own
markers (`<|im_end|>`, `</think>`...), and templates that alter contents (e.g. `strip()`) always go
through Jinja and a full encoding; so does everything with `preprocess.fast_render: false`.
Token ids come from the fast tokenizer's batch encoder (Rust), without special tokens (the
template already holds them), exactly as `apply_chat_template(tokenize=True)` counts them.

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any

from ftpipe.core.errors import InputError
from ftpipe.handoff import chosen_template
from ftpipe.handoff.chat_template import tool_support

log = logging.getLogger(__name__)

VERIFY_FIRST = 2  # rows of each shape compared with Jinja before the skeleton is trusted
VERIFY_EVERY = 997  # then every n-th fast-rendered row is compared again
CACHE_ROWS = 20_000  # token counts of repeated contents kept between batches
CACHE_CHARS = 512
_SENTINEL = "\n\x1f@ftpipe{}@\x1f \n"
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_MARKUP = re.compile(r"[<\[|{}]")


def load_tokenizer(model_cfg, root):
    """The model's tokenizer and its ModelRef: from the tokenizer cache when it holds this model's
    (ftpipe/data/tokenizer_cache.py), else AutoTokenizer (`trust_remote_code` from the config),
    which then fills the cache.

    Raises:
        InputError: the model cannot be resolved, the tokenizer cannot load, or it has no chat template
            and `model.chat_template` is not set.
        ConfigError: a `model.chat_template` that cannot be used.
    """
    from ftpipe.core.model_ref import resolve_model
    from ftpipe.data import tokenizer_cache

    ref = resolve_model(model_cfg, root)
    cache = tokenizer_cache.entry_path(ref, model_cfg, root)
    cached = tokenizer_cache.load(cache) if cache else None
    if cached is not None:
        log.info("tokenizer of %s from the tokenizer cache (%s)", ref.load_from, cache.name)
        tokenizer = cached
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                ref.load_from, trust_remote_code=model_cfg.trust_remote_code, **ref.pretrained_kwargs()
            )
        except (OSError, ValueError) as exc:
            raise InputError(
                f"model {ref.load_from}: cannot load its tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                hint="check model.path / model.id",
            ) from None
    if cache and cached is None:
        tokenizer_cache.save(cache, tokenizer)  # the folder's own tokenizer, before model.chat_template
    chosen_template.use(tokenizer, model_cfg, root, model_cfg.path or ref.load_from, "ftpipe preprocess-sft")
    return tokenizer, ref


def tokenizer_record(tokenizer, ref, root, model_cfg=None) -> dict[str, Any]:
    """What metadata.json says about the tokenizer (and, given the `model` section, which chat template:
    `model.chat_template` or the model's own)."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    return {
        "model": ref.record(root),
        "class": getattr(tokenizer, "class_name", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        **({"chat_template": chosen_template.record(tokenizer, chosen_template.resolve(model_cfg, root))}
           if model_cfg is not None else {}),
    }


TOOLS_HEADER = "You can call these tools (JSON definitions):"
TOOL_RESULT = "Tool result"


def tools_as_text(row: dict) -> dict:
    """`row` with its tools written as plain text, for a chat template that does not render them
    (`preprocess.tools_fallback: text`):

    - tool definitions -> the system message gets `TOOLS_HEADER` and one JSON definition a line
      (a system message is added when the row has none);
    - an assistant's tool calls -> its content, then one `<tool_call>{"name": ..., "arguments": ...}</tool_call>` a line;
    - a `tool` message -> a `user` message `Tool result (name): ...` (templates that know no tool
      role often insist on user/assistant turns).
    """
    messages = []
    for m in row["messages"]:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function", {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except json.JSONDecodeError:
                        pass
                calls.append("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
                             + "</tool_call>")
            content = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            messages.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            name = f" ({m['name']})" if m.get("name") else ""
            messages.append({"role": "user", "content": f"{TOOL_RESULT}{name}: {m['content']}"})
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    if row.get("tools"):
        text = TOOLS_HEADER + "\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in row["tools"])
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
        else:
            messages.insert(0, {"role": "system", "content": text})
    return {"messages": messages}


class ToolsNotRendered(ValueError):
    """A row uses tools / tool calls and the chat template drops them (reported as that row's error)."""


class Renderer:
    """Renders conversations with the chat template and counts their tokens in batches."""

    def __init__(self, tokenizer, fast: bool = True) -> None:
        self.tokenizer = tokenizer
        self.fast = fast
        self.backend = getattr(tokenizer, "_tokenizer", None)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        literals = {a or b for a, b in _LITERAL.findall(template)}
        self.markers = sorted(m for m in literals if len(m) >= 3 and _MARKUP.search(m) and "\\" not in m)
        self.skeletons: dict[tuple, list[str] | None] = {}
        self.checked: dict[tuple, int] = {}
        self.pieces_of: dict[tuple, list[str]] = {}
        self.additive: dict[tuple, bool] = {}
        self.piece_tokens: dict[tuple, int] = {}
        self.content_tokens: dict[str, int] = {}
        self.stats = {"fast": 0, "jinja": 0, "mismatches": 0, "segmented": 0}
        self._tools: dict[str, bool] | None = None  # tool_support, probed at the first row that needs it

    def tools_problem(self, row: dict) -> ToolsNotRendered | None:
        """The error for a row whose tools / tool calls the chat template would drop, else None."""
        uses = []
        if row.get("tools"):
            uses.append("tools")
        if any(m.get("tool_calls") or m.get("role") == "tool" for m in row["messages"]):
            uses.append("tool_calls")
        if not uses:
            return None
        if self._tools is None:
            self._tools = tool_support(self.tokenizer)
            log.info("chat template renders: tool definitions %s, tool calls %s",
                     self._tools["tools"], self._tools["tool_calls"])
        dropped = [u for u in uses if not self._tools[u]]
        if not dropped:
            return None
        what = " or ".join("tool definitions" if u == "tools" else "tool calls" for u in dropped)
        return ToolsNotRendered(
            f"it does not render {what} (the tool turns would train empty): use a model whose chat template "
            "supports tools, set preprocess.tools_fallback=text, or remove the row's tools"
        )

    def render(self, row: dict) -> str:
        """The full Jinja rendering of one row (messages + tools)."""
        return self.tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)

    def _shape(self, row: dict) -> tuple | None:
        if not self.fast or "tools" in row:
            return None
        messages = row["messages"]
        for m in messages:
            if len(m) != 2:  # tool_calls, name, tool_call_id: Jinja handles them
                return None
        joined = "\x00".join([m["content"] for m in messages])
        if "\x1f@ftpipe" in joined:
            return None
        for marker in self.markers:  # a content holding a template marker goes through Jinja
            if marker in joined:
                return None
        return tuple([m["role"] for m in messages])

    def _skeleton(self, shape: tuple) -> list[str] | None:
        if shape not in self.skeletons:
            sentinels = [_SENTINEL.format(i) for i in range(len(shape))]
            messages = [{"role": r, "content": s} for r, s in zip(shape, sentinels)]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:  # noqa: BLE001 - the template rejects this shape: rows will say why
                self.skeletons[shape] = None
                return None
            pieces, rest = [], text
            for s in sentinels:
                if rest.count(s) != 1:  # content altered, dropped or repeated: no skeleton
                    self.skeletons[shape] = None
                    return None
                head, rest = rest.split(s)
                pieces.append(head)
            pieces.append(rest)
            self.skeletons[shape] = self.pieces_of[shape] = pieces
        return self.skeletons[shape]

    def _join(self, pieces: list[str], row: dict) -> str:
        parts = [pieces[0]]
        for m, piece in zip(row["messages"], pieces[1:]):
            parts += [m["content"], piece]
        return "".join(parts)

    def measure(self, rows: list[dict]) -> list[int | Exception]:
        """Token count of each rendered row (or the exception the chat template raised for it).

        Rows of a verified shape are counted as the shape's piece tokens plus the tokens of each
        content (contents cached: system prompts and short answers repeat), when the tokenizer
        splits at the piece/content boundaries - checked against the full encoding on the first
        rows of each shape and every `VERIFY_EVERY`-th; otherwise the full text is encoded.
        """
        results: list[Any] = [None] * len(rows)
        full: dict[int, str] = {}  # row index -> text to encode whole
        segmented: list[tuple[int, tuple]] = []
        checks: list[tuple[int, tuple]] = []
        for i, row in enumerate(rows):
            shape = self._shape(row)
            # A shape means no `tools` and only role/content keys: a tool role is the one tool use left
            # to look for (a tuple scan; the full check per message cost ~5% of the stage).
            if shape is None or "tool" in shape:
                problem = self.tools_problem(row)
                if problem is not None:
                    results[i] = problem
                    continue
            pieces = self._skeleton(shape) if shape is not None else None
            if pieces is None:
                text = self._jinja(row)
                if isinstance(text, Exception):
                    results[i] = text
                else:
                    full[i] = text
                continue
            n = self.checked.get(shape, 0)
            self.checked[shape] = n + 1
            additive = self.additive.get(shape, True)
            if n < VERIFY_FIRST or n % VERIFY_EVERY == 0:
                text = self._join(pieces, row)
                slow = self._jinja(row)
                if slow != text:
                    self.stats["mismatches"] += 1
                    self.skeletons[shape] = None  # this shape renders content-dependently
                    log.info("chat template renders %s content-dependently: using Jinja for it", "/".join(shape))
                    full[i] = slow
                    continue
                full[i] = text
                if additive:
                    checks.append((i, shape))
                continue
            self.stats["fast"] += 1
            if additive:
                segmented.append((i, shape))
            else:
                full[i] = self._join(pieces, row)
        contents = {m["content"] for i, _ in segmented + checks for m in rows[i]["messages"]}
        cache = self.content_tokens
        new = [c for c in contents if c not in cache]
        counted = dict(zip(new, self.count(new)))
        # Cache short contents only (system prompts and labels repeat; most prompts do not), and
        # start over when full: memory stays bounded whatever the number of rows.
        lookup = {**counted, **{c: cache[c] for c in contents if c not in counted}}
        if len(cache) > CACHE_ROWS:
            cache.clear()
        cache.update((c, n) for c, n in counted.items() if len(c) <= CACHE_CHARS)
        order = list(full)
        for i, n in zip(order, self.count([full[i] for i in order])):
            results[i] = n

        def by_segments(i: int, shape: tuple) -> int:
            if shape not in self.piece_tokens:
                self.piece_tokens[shape] = sum(self.count([p for p in self.skeleton_pieces(shape) if p]))
            return self.piece_tokens[shape] + sum(lookup[m["content"]] for m in rows[i]["messages"])

        failed = set()
        for i, shape in checks:
            if by_segments(i, shape) != results[i]:
                failed.add(shape)
                self.additive[shape] = False
                log.info("tokenizer merges across the template of %s: encoding whole texts for it", "/".join(shape))
        redo = [(i, shape) for i, shape in segmented if shape in failed]
        for (i, shape), n in zip(redo, self.count([self._join(self.skeleton_pieces(s), rows[i]) for i, s in redo])):
            results[i] = n
        for i, shape in segmented:
            if shape not in failed:
                results[i] = by_segments(i, shape)
                self.stats["segmented"] += 1
        return results

    def skeleton_pieces(self, shape: tuple) -> list[str]:
        """The literal pieces of a shape's skeleton (kept even after a content-dependent mismatch)."""
        return self.pieces_of[shape]

    def _jinja(self, row: dict) -> str | Exception:
        self.stats["jinja"] += 1
        try:
            return self.render(row)
        except Exception as exc:  # noqa: BLE001 - reported as this row's error
            return exc

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of the tokens of `text` encoded alone."""
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=False).offsets
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of rendered texts (batched, no special tokens added)."""
        if not texts:
            return []
        if self.backend is not None and hasattr(self.backend, "encode_batch_fast"):
            return [len(e.ids) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
