"""Fuzz the dataset readers and row normalisers (preprocess-sft, in-process) with hypothesis.

Each example writes a generated file (JSONL, JSON array, CSV or Parquet) of many rows of random
structure, types and unicode, then runs exactly what `preprocess-sft` runs on it: container
detection, the streaming reader, format detection, the row normaliser, dedupe, and token counting
with the real chat-template renderer of the tiny model (`_process`). The only exceptions allowed out
are the project's own `InputError` (whole-file problems); bad rows must come back as counted row
errors. Every kept row must be written as one valid UTF-8 JSON line in the prepared-row shape.
Over all examples more than 10,000 rows are generated (checked by the last test).
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ftpipe.core.errors import InputError
from ftpipe.data.config import DataConfig, PreprocessConfig
from ftpipe.data.formats import ROLES
from ftpipe.data.preprocess_sft import _process, Seen, _Stats, open_input
from ftpipe.data.readers import Source

ROWS = {"total": 0}
import os
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))  # per container; rows per example 40..120 (larger lists overrun hypothesis's buffer) -> well over 10,000 rows in all

# ------------------------------------------------------------------ value strategies

text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=24) | st.sampled_from(
    ["", " ", "hi", "<|im_end|>", "<|im_start|>assistant\n", "{{ x }}", "{% if %}", "\x1f@ftpipe0@\x1f",
     "\u0000", "\ud800", "\U0001F600", "a" * 300, "\n\n", "null", "[1,", "{\"a\":"]
)
scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
json_value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text | st.sampled_from(["role", "content", "type", "text"]), inner, max_size=4),
    max_leaves=12,
)
role = st.sampled_from([*ROLES, "human", "gpt", "robot", "", "Assistant"]) | json_value
speaker = st.sampled_from(["human", "gpt", "system", "tool", "observation", "function_call", "alien", "GPT"]) | json_value


def maybe(strategy):
    """The plausible value most of the time, anything JSON otherwise."""
    return st.one_of(strategy, strategy, strategy, json_value)


part = st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(text)})
call = st.fixed_dictionaries(
    {"type": st.just("function"),
     "function": maybe(st.fixed_dictionaries({"name": maybe(text), "arguments": maybe(text | st.dictionaries(text, scalar, max_size=3))}))}
)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(ROLES)), "content": maybe(text | st.lists(part, max_size=2))},
    optional={"tool_calls": maybe(st.lists(call, max_size=2)), "name": maybe(text), "tool_call_id": maybe(text),
              "extra": json_value},
)
messages_row = st.fixed_dictionaries(
    {"messages": maybe(st.lists(message, max_size=5))}, optional={"tools": maybe(st.lists(json_value, max_size=2))}
)
sharegpt_row = st.fixed_dictionaries(
    {"conversations": maybe(st.lists(st.fixed_dictionaries({"from": speaker, "value": maybe(text)}), max_size=5))},
    optional={"system": maybe(text), "tools": maybe(text | st.lists(json_value, max_size=2))},
)
alpaca_row = st.fixed_dictionaries(
    {"instruction": maybe(text), "output": maybe(text)},
    optional={"input": maybe(text), "system": maybe(text),
              "history": maybe(st.lists(st.lists(maybe(text), min_size=1, max_size=3), max_size=3))},
)
pc_row = st.fixed_dictionaries(
    {"prompt": maybe(text | st.lists(message, max_size=3)), "completion": maybe(text | st.lists(message, max_size=3))},
    optional={"system": maybe(text)},
)
text_row = st.fixed_dictionaries({"text": maybe(text)})
annotation = st.fixed_dictionaries(
    {"id": maybe(st.integers(0, 9)), "result": maybe(st.lists(st.fixed_dictionaries(
        {"type": maybe(st.just("textarea")), "from_name": maybe(st.just("answer")),
         "value": maybe(st.fixed_dictionaries({"text": maybe(st.lists(maybe(text), max_size=2))}))}), max_size=2))},
    optional={"was_cancelled": maybe(st.booleans()), "ground_truth": maybe(st.booleans()),
              "updated_at": maybe(text), "created_at": maybe(text)},
)
ls_task = st.fixed_dictionaries(
    {"id": maybe(st.integers(0, 99)), "data": maybe(st.fixed_dictionaries({"prompt": maybe(text)}, optional={"system": maybe(text)})),
     "annotations": maybe(st.lists(annotation, max_size=3))},
)
any_row = st.one_of(messages_row, sharegpt_row, alpaca_row, pc_row, text_row, json_value)


def rows_of(row):
    """A list of rows, mostly of one format (so format detection picks it), sometimes mixed."""
    return st.lists(st.one_of(row, row, row, row, any_row), min_size=40, max_size=120)


# ------------------------------------------------------------------ the pipeline under test

class _Renderer:
    """The real chat-template renderer of the tiny model, shared by every example."""

    def __init__(self, tokenizer) -> None:
        from ftpipe.data.render import Renderer

        self.renderer = Renderer(tokenizer)

    def get(self):
        return self.renderer


@pytest.fixture(scope="module")
def renderer(tiny_model_dir):
    from transformers import AutoTokenizer

    return _Renderer(AutoTokenizer.from_pretrained(tiny_model_dir))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def run_reader(path: Path, renderer, n_rows: int, fmt: str = "auto", **pre) -> tuple[_Stats, list[str]]:
    """What preprocess-sft does with one file: every kept line, or InputError."""
    ROWS["total"] += n_rows
    data = DataConfig(source=str(path), format=fmt)
    settings_ = PreprocessConfig(**pre)
    stats = _Stats(strict=False, shown=0)
    sink = io.StringIO()
    lengths = []
    try:
        detected, records, _ = open_input(Source(path, path.name), data, None)
        from array import array

        lengths = array("I")
        _process(Source(path, path.name), detected, records, data, settings_, renderer, stats, Seen(), sink, lengths)
    except InputError as exc:
        assert exc.one_line() and "\n" not in exc.one_line()
        return stats, []
    lines = sink.getvalue().split("\n")[:-1]  # not splitlines(): U+0085/U+2028 stay raw in JSON
    assert len(lines) == len(lengths)
    for line in lines:
        line.encode("utf-8")  # what the real sink (an UTF-8 file) does: must not raise
        row = json.loads(line)
        assert isinstance(row["messages"], list) and row["messages"]
        for m in row["messages"]:
            assert m["role"] in ROLES and isinstance(m["content"], str)
    assert stats.read >= len(lines)
    return stats, lines


def _jsonl(rows, seed: int) -> bytes:
    rnd = random.Random(seed)
    out = []
    for row in rows:
        line = json.dumps(row, ensure_ascii=rnd.random() < 0.5, allow_nan=True)
        roll = rnd.random()
        if roll < 0.03:
            line = line[: rnd.randrange(len(line) + 1)]  # a cut line
        elif roll < 0.05:
            line = "\ufeff" + line
        elif roll < 0.07:
            line = "   "
        out.append(line.encode("utf-8", "surrogatepass"))
    return b"\n".join(out) + (b"\n" if rnd.random() < 0.8 else b"")


# ------------------------------------------------------------------ the fuzz tests

# No shrinking phase: shrinking lists of 100 rows takes minutes; the failing example is printed as is.
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])


@pytest.mark.slow
@SETTINGS
@given(rows=st.one_of(rows_of(messages_row), rows_of(sharegpt_row), rows_of(alpaca_row), rows_of(pc_row),
                      rows_of(text_row), rows_of(json_value)),
       seed=st.integers(0, 2**16), truncate=st.booleans())
def test_fuzz_jsonl(tmp_path_factory, renderer, rows, seed, truncate):
    path = _write(tmp_path_factory.mktemp("jsonl") / "in.jsonl", _jsonl(rows, seed))
    run_reader(path, renderer, len(rows), max_length=24 if truncate else 4096,
               overlength="truncate" if truncate else "drop")


@pytest.mark.slow
@SETTINGS
@given(rows=st.one_of(rows_of(messages_row), rows_of(ls_task), rows_of(alpaca_row), rows_of(any_row)),
       ascii_=st.booleans(), fmt=st.sampled_from(["auto", "auto", "messages", "label_studio", "alpaca", "text"]))
def test_fuzz_json_array(tmp_path_factory, renderer, rows, ascii_, fmt):
    body = json.dumps(rows, ensure_ascii=ascii_, indent=1 if ascii_ else None)
    path = _write(tmp_path_factory.mktemp("json") / "in.json", body.encode("utf-8", "surrogatepass"))
    run_reader(path, renderer, len(rows), fmt=fmt)


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.slow
@SETTINGS
@given(rows=st.one_of(rows_of(alpaca_row), rows_of(pc_row), rows_of(messages_row), rows_of(sharegpt_row)),
       tsv=st.booleans())
def test_fuzz_csv(tmp_path_factory, renderer, rows, tsv):
    header = ["instruction", "input", "output", "prompt", "completion", "messages", "conversations", "text", "system"]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if tsv else ",")
    writer.writerow(header)
    for row in rows:
        row = row if isinstance(row, dict) else {"text": row}
        writer.writerow([_cell(row.get(col, "")) for col in header])
    path = _write(tmp_path_factory.mktemp("csv") / ("in.tsv" if tsv else "in.csv"),
                  buf.getvalue().encode("utf-8", "surrogatepass"))
    run_reader(path, renderer, len(rows))


@pytest.mark.slow
@SETTINGS
@given(rows=st.one_of(rows_of(alpaca_row), rows_of(pc_row), rows_of(text_row)))
def test_fuzz_parquet(tmp_path_factory, renderer, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {"instruction": [], "output": [], "prompt": [], "completion": [], "text": []}
    for row in rows:
        row = row if isinstance(row, dict) else {"text": row}
        for col, values in columns.items():
            value = row.get(col)
            # Parquet columns are typed: strings (lone surrogates cannot be stored) or nulls.
            values.append(None if value is None else _cell(value).encode("utf-8", "replace").decode("utf-8"))
    path = tmp_path_factory.mktemp("pq") / "in.parquet"
    pq.write_table(pa.table(columns), path)
    run_reader(path, renderer, len(rows))


@pytest.mark.parametrize("case", ["deep_nesting", "deep_nesting_array", "deep_nesting_csv", "deep_tools", "huge_line", "binary", "lone_surrogate", "nul_bytes"])
def test_hostile_rows_in_process(tmp_path, renderer, case):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    body = {
        "deep_nesting": good + "\n" + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        "deep_nesting_array": "[" + good + ", {\"messages\": " + "[" * 100_000 + "]" * 100_000 + "}]",
        "deep_nesting_csv": "instruction,output,history\na,b,\nc,d,\"" + "[" * 30_000 + "]" * 30_000 + "\"\n",
        "deep_tools": good + "\n" + json.dumps({"messages": json.loads(good)["messages"], "tools": "@"}).replace(
            '"@"', "[" * 990 + "]" * 990) + "\n",
        "huge_line": good + "\n" + json.dumps({"text": "x" * 1_000_000}) + "\n",
        "binary": None,
        "lone_surrogate": good + "\n" + '{"text": "bad \\ud800 half"}\n',
        "nul_bytes": good + "\n" + '{"text": "a\\u0000b"}\n',
    }[case]
    data = bytes(range(256)) * 64 if body is None else body.encode("utf-8")
    suffix = {"deep_nesting_array": ".json", "deep_nesting_csv": ".csv"}.get(case, ".jsonl")
    path = _write(tmp_path / f"in{suffix}", data)
    stats, lines = run_reader(path, renderer, 2)
    if case in ("binary", "deep_nesting_array"):
        assert lines == []  # a whole-file InputError
    else:
        assert len(lines) >= 1  # the good row survives the bad one


@pytest.mark.slow  # it counts the rows of the slow fuzz tests above: run alone it would fail
def test_more_than_10000_rows_were_fuzzed():
    assert ROWS["total"] >= 10_000, ROWS
