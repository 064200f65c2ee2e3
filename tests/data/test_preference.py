"""preprocess-dpo: every preference input shape -> the hand-off pairs, bad rows, split, drops, CLI exit 2.

The stage runs in-process on the tiny model (the tokenizer stays loaded between tests); one test
goes through the real CLI for the exit code and the one error line.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from conftest import run_cli
from ftpipe.core.errors import ConfigError, InputError
from ftpipe.handoff.pairs import read_pairs


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


class Prefs:
    """A throwaway project on the tiny model whose preference data is data/<file>."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.model = model
        (root / "data").mkdir()

    def config(self, source: str, extra: str = "") -> None:
        (self.root / "config.yaml").write_text(
            f"model:\n  path: {self.model}\ndata:\n  name: sft\n"
            f"preference:\n  name: prefs\n  source: {source}\n  val_fraction: 0.0\n  max_length: 256\n{extra}",
            encoding="utf-8")

    def write(self, name: str, content: str | bytes, extra: str = "") -> Path:
        path = self.root / "data" / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        self.config(f"data/{name}", extra)
        return path

    def jsonl(self, name: str, rows: list, extra: str = "") -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows), extra)

    def stage(self, *sets: str, force: bool = True):
        from ftpipe.config import load_config
        from ftpipe.stages import run_stage

        loaded = load_config(self.root / "config.yaml", list(sets), environ={})
        return run_stage("preprocess-dpo", loaded, force=force)

    def out(self, split: str = "train") -> list[dict]:
        return list(read_pairs(self.root / "prepared/prefs" / f"{split}.jsonl"))

    def metadata(self) -> dict:
        return json.loads((self.root / "prepared/prefs/metadata.json").read_text(encoding="utf-8"))


@pytest.fixture
def prefs(tmp_path, tiny_model_dir) -> Prefs:
    return Prefs(tmp_path, tiny_model_dir)


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": [bot(chosen)], "rejected": [bot(rejected)]}


# -- every input shape -> exactly the hand-off rows ------------------------------------------------

TRL_ROWS = [
    {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."},
    {"prompt": [system("Be brief."), user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]},
    {"prompt": [user("Hi"), bot("Hello!"), user("Name a fruit.")], "chosen": "Apple.", "rejected": [bot("A car.")]},
]
TRL_PAIRS = [
    pair([user("Is the sky blue?")], "Yes.", "No."),
    pair([system("Be brief."), user("2+2?")], "4", "5"),
    pair([user("Hi"), bot("Hello!"), user("Name a fruit.")], "Apple.", "A car."),
]


def test_trl_explicit_prompt(prefs):
    prefs.jsonl("p.jsonl", TRL_ROWS)
    result = prefs.stage()
    assert prefs.out() == TRL_PAIRS
    assert prefs.out("val") == []
    meta = prefs.metadata()
    assert meta["format"] == "trl" and meta["kind"] == "preference"
    assert meta["counts"] == {"read": 3, "kept": 3, "train": 3, "val": 0,
                              "dropped": {"invalid": 0, "identical": 0, "duplicate": 0, "too_long": 0}}
    assert meta["tokens"]["rows"] == 3 and 0 < meta["tokens"]["max"] <= 256
    assert meta["tokenizer"]["chat_template_sha256"]
    assert result.summary.startswith("prepared/prefs/: 3 train + 0 val pairs")
    # The manifest sits under preference.name (not data.name): Stage.dataset.
    assert (prefs.root / "logs/_prepared/prefs/manifest.json").is_file()
    assert not (prefs.root / "logs/_prepared/sft").exists()
    assert not list((prefs.root / "prepared/prefs").glob(".*tmp"))


def test_trl_implicit_prompt(prefs):
    prefs.jsonl("p.jsonl", [
        {"chosen": [user("Capital of France?"), bot("Paris.")], "rejected": [user("Capital of France?"), bot("Rome.")]},
        {"chosen": [system("S"), user("a"), bot("b"), user("c"), bot("good")],
         "rejected": [system("S"), user("a"), bot("b"), user("c"), bot("bad")]},
        # The first answers differ: the shared prompt stops at the last shared user turn, and two
        # answer turns are left: not one pair.
        {"chosen": [user("a"), bot("x"), user("c"), bot("y")], "rejected": [user("a"), bot("z"), user("c"), bot("w")]},
    ])
    prefs.stage()
    assert prefs.out() == [
        pair([user("Capital of France?")], "Paris.", "Rome."),
        pair([system("S"), user("a"), bot("b"), user("c")], "good", "bad"),
    ]
    assert prefs.metadata()["errors"]["first"] == [
        "data/p.jsonl:3: chosen: after the shared prompt (1 turns) expected exactly one assistant message, "
        "got 3 messages (assistant, user, assistant)"]


SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Say hi."}],
     "chosen": {"from": "gpt", "value": "Hi!"}, "rejected": {"from": "gpt", "value": "No."}},
    {"system": "You are kind.",
     "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"}},
]


def test_llamafactory_sharegpt_json_array(prefs):
    prefs.write("p.json", json.dumps(SHAREGPT, indent=1))
    prefs.stage()
    assert prefs.metadata()["format"] == "sharegpt"
    assert prefs.out() == [
        pair([user("Say hi.")], "Hi!", "No."),
        pair([system("You are kind."), user("a"), bot("b"), user("c")], "yes", "no"),
    ]


ALPACA = [
    {"instruction": "Translate to French", "input": "cat", "chosen": "chat", "rejected": "chien"},
    {"instruction": "Rate it", "chosen": "5", "rejected": "1", "system": "Rater.", "history": [["hi", "hello"]]},
]
ALPACA_PAIRS = [
    pair([user("Translate to French\ncat")], "chat", "chien"),
    pair([system("Rater."), user("hi"), bot("hello"), user("Rate it")], "5", "1"),
]


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "chosen", "rejected"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
    return out.getvalue().encode("utf-8")


@pytest.mark.parametrize("name, make, rows, expected", [
    ("p.jsonl.gz", lambda rows: gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()), ALPACA, ALPACA_PAIRS),
    ("p.jsonl.bz2", lambda rows: bz2.compress("".join(json.dumps(r) + "\n" for r in rows).encode()), TRL_ROWS, TRL_PAIRS),
    ("p.json.zst", lambda rows: _zstd(json.dumps(rows).encode()), SHAREGPT,
     [pair([user("Say hi.")], "Hi!", "No."), pair([system("You are kind."), user("a"), bot("b"), user("c")], "yes", "no")]),
    ("p.csv", _csv, TRL_ROWS, TRL_PAIRS),  # message lists as JSON cells, answers as text cells
    ("p.csv.gz", lambda rows: gzip.compress(_csv(rows)), TRL_ROWS, TRL_PAIRS),
], ids=["alpaca-jsonl.gz", "trl-jsonl.bz2", "sharegpt-json.zst", "trl-csv", "trl-csv.gz"])
def test_containers_and_compression(prefs, name, make, rows, expected):
    prefs.write(name, make(rows))
    prefs.stage()
    assert prefs.out() == expected


def test_parquet(prefs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["Is the sky blue?", "2+2?"], "chosen": ["Yes.", "4"], "rejected": ["No.", "5"]})
    pq.write_table(table, prefs.root / "data/p.parquet")
    prefs.config("data/p.parquet")
    prefs.stage()
    assert prefs.out() == [pair([user("Is the sky blue?")], "Yes.", "No."), pair([user("2+2?")], "4", "5")]


def ls_task(ident, prompt, a1, a2, annotations, **data):
    return {"id": ident, "data": {"prompt": prompt, "answer1": a1, "answer2": a2, **data}, "annotations": annotations,
            "predictions": []}


def pairwise(selected, cancelled=False, **extra):
    # The result item as Label Studio stores a Pairwise tag's choice (label_studio/tasks/tests/test_api.py).
    return {"id": 1, "was_cancelled": cancelled, "ground_truth": False, "created_at": "2024-05-01T10:00:00Z",
            "result": [{"id": "r1", "from_name": "comparison", "to_name": "answer1", "type": "pairwise",
                        "origin": "manual", "value": {"selected": selected}}], **extra}


def test_label_studio_pairwise_export(prefs):
    prefs.write("export.json", json.dumps([
        ls_task(1, "Why RLHF?", "Because of A.", "Because of B.", [pairwise("left")]),
        ls_task(2, "Best pet?", "A rock.", "A dog.", [pairwise("right")], system="Answer plainly."),
        ls_task(3, "Unlabelled?", "x", "y", []),  # not annotated: dropped, not an error
        ls_task(4, "Skipped?", "x", "y", [pairwise("left", cancelled=True)]),  # cancelled: the same
        ls_task(5, "Bad choice?", "x", "y", [pairwise("middle")]),
        ls_task(6, "No pairwise?", "x", "y", [{"id": 2, "result": [{"type": "choices", "value": {"choices": ["a"]}}]}]),
    ], indent=2))
    prefs.stage()
    assert prefs.out() == [
        pair([user("Why RLHF?")], "Because of A.", "Because of B."),
        pair([system("Answer plainly."), user("Best pet?")], "A dog.", "A rock."),
    ]
    meta = prefs.metadata()
    assert meta["format"] == "label_studio"
    assert meta["counts"]["dropped"] == {"invalid": 2, "identical": 0, "duplicate": 0, "too_long": 0, "no_annotation": 2}
    starts = [n for n, text in enumerate((prefs.root / "data/export.json").read_text().splitlines(), 1) if text == "  {"]
    assert meta["errors"]["first"] == [  # file:line of the task's opening brace
        f"data/export.json:{starts[4]}: annotations[0].result[0].value.selected: expected 'left' or 'right', "
        "got 'middle'",
        f"data/export.json:{starts[5]}: annotations[0].result: no pairwise result (a Pairwise tag)",
    ]


def test_label_studio_mapped_fields(prefs):
    task = {"id": 1, "data": {"question": "Q?", "left": "L", "right": "R"},
            "annotations": [{"result": [{"from_name": "pick", "type": "pairwise", "value": {"selected": "right"}}]}]}
    prefs.write("export.json", json.dumps([task]),
                "  label_studio:\n    prompt_field: question\n    left_field: left\n    right_field: right\n"
                "    from_name: pick\n")
    prefs.stage()
    assert prefs.out() == [pair([user("Q?")], "R", "L")]


# -- bad rows, drops, split ---------------------------------------------------------------------------

BAD = [
    {"prompt": "ok", "chosen": "a", "rejected": "b"},
    {"prompt": "same", "chosen": "a", "rejected": "a"},
    {"prompt": [user("q"), bot("a")], "chosen": "a", "rejected": "b"},
    {"prompt": "q", "chosen": [bot("a"), bot("b")], "rejected": "c"},
    {"prompt": "q", "chosen": "a"},
    {"prompt": "q", "chosen": [{"role": "tool", "content": "x"}], "rejected": "c"},
    {"prompt": "q", "chosen": 3, "rejected": "c"},
    {"chosen": "a", "rejected": "b"},
    {"prompt": "q", "chosen": "  ", "rejected": "c"},
]


def test_bad_rows_one_line_each(prefs, caplog):
    path = prefs.jsonl("p.jsonl", BAD)
    with path.open("a") as fh:
        fh.write("{not json}\n")
    with caplog.at_level("WARNING"):
        prefs.stage()
    expected = [
        "data/p.jsonl:2: chosen: the same text as rejected: nothing to prefer",
        "data/p.jsonl:3: prompt: the prompt must end with a user turn, not assistant",
        "data/p.jsonl:4: chosen: expected exactly one assistant message, got 2 messages (assistant, assistant)",
        "data/p.jsonl:5: rejected: missing",
        "data/p.jsonl:6: chosen[0].role: 'tool' is not one of system, user, assistant (preference pairs hold no tool turns)",
        "data/p.jsonl:7: chosen: expected a string or a list of messages, got number",
        "data/p.jsonl:8: prompt: missing: a text chosen needs a prompt (without one, chosen and rejected are whole "
        "conversations sharing the prompt turns)",
        "data/p.jsonl:9: chosen: empty answer",
        "data/p.jsonl:10: <line>: not valid JSON: Expecting property name enclosed in double quotes at column 2",
    ]
    meta = prefs.metadata()
    assert meta["errors"] == {"count": 9, "first": expected}
    assert meta["counts"]["dropped"] == {"invalid": 8, "identical": 1, "duplicate": 0, "too_long": 0}
    assert prefs.out() == [pair([user("ok")], "a", "b")]
    shown = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert shown[:9] == expected  # one line each, all shown (errors_shown 10)


def test_errors_shown_caps_the_lines_not_the_count(prefs, caplog):
    prefs.jsonl("p.jsonl", BAD, extra="  errors_shown: 2\n")
    with caplog.at_level("WARNING"):
        prefs.stage()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data/p.jsonl:")]
    assert len(lines) == 2 and prefs.metadata()["errors"]["count"] == 8


def test_strict_stops_at_the_first_bad_row(prefs):
    prefs.jsonl("p.jsonl", BAD, extra="  strict: true\n")
    with pytest.raises(InputError) as err:
        prefs.stage()
    assert err.value.message == "data/p.jsonl:2: chosen: the same text as rejected: nothing to prefer"


def test_row_over_max_row_bytes(prefs):
    prefs.jsonl("p.jsonl", [TRL_ROWS[0], {"prompt": "q" * 300, "chosen": "a", "rejected": "b"}],
                extra="  max_row_bytes: 200\n")
    prefs.stage()
    assert prefs.metadata()["errors"]["first"] == [
        "data/p.jsonl:2: <row>: 0.0 MiB, over preference.max_row_bytes (0.0 MiB)"]
    assert prefs.metadata()["counts"]["dropped"]["too_large"] == 1


def test_dedupe(prefs):
    rows = [TRL_ROWS[0], TRL_ROWS[1], dict(TRL_ROWS[0]), {"prompt": [user("Is the sky blue?")], "chosen": "Yes.",
                                                          "rejected": [bot("No.")]}]
    prefs.jsonl("p.jsonl", rows)
    prefs.stage()
    assert prefs.out() == TRL_PAIRS[:2]  # the same pair written two ways is a duplicate too
    assert prefs.metadata()["counts"]["dropped"]["duplicate"] == 2
    prefs.stage("preference.dedupe=false")
    assert len(prefs.out()) == 4


def test_overlength_pairs_dropped_and_counted(prefs):
    long = " ".join(["word"] * 200)
    prefs.jsonl("p.jsonl", [TRL_ROWS[0], {"prompt": "q", "chosen": "short", "rejected": long}], extra="")
    prefs.stage("preference.max_length=64")
    assert prefs.out() == TRL_PAIRS[:1]
    meta = prefs.metadata()
    assert meta["counts"]["dropped"]["too_long"] == 1 and meta["tokens"]["max"] <= 64
    # Every pair too long: exit 2 with the key to raise.
    with pytest.raises(InputError) as err:
        prefs.stage("preference.max_length=8")
    assert "no usable preference pairs (2 read; dropped: 2 too long (first: data/p.jsonl:1, " in err.value.message
    assert err.value.hint == "raise the budget: ftpipe preprocess-dpo --set preference.max_length=4096"


def test_val_split_is_deterministic(prefs):
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    prefs.jsonl("p.jsonl", rows, extra="")
    prefs.stage("preference.val_fraction=0.2")
    train, val = prefs.out(), prefs.out("val")
    assert len(train) == 16 and len(val) == 4
    assert sorted(p["prompt"][0]["content"] for p in train + val) == sorted(r["prompt"] for r in rows)
    prefs.stage("preference.val_fraction=0.2")
    assert (prefs.out(), prefs.out("val")) == (train, val)
    prefs.stage("preference.val_fraction=0.2", "preference.seed=7")
    assert prefs.out("val") != val and len(prefs.out("val")) == 4
    # A separate val file: the main file is all train.
    prefs.root.joinpath("data/val.jsonl").write_text(json.dumps(TRL_ROWS[0]) + "\n")
    prefs.stage("preference.val_source=data/val.jsonl")
    assert len(prefs.out()) == 20 and prefs.out("val") == TRL_PAIRS[:1]
    assert prefs.metadata()["val_source"]["format"] == "trl"


def test_second_run_is_skipped(prefs):
    prefs.jsonl("p.jsonl", TRL_ROWS)
    prefs.stage()
    again = prefs.stage(force=False)
    assert again.skipped and again.summary == "preprocess-dpo: up to date, skipped (use --force to rerun)"


def test_refusals(prefs):
    prefs.jsonl("p.jsonl", [{"messages": [user("a"), bot("b")]}])
    with pytest.raises(InputError) as err:
        prefs.stage()
    assert err.value.message.startswith("data/p.jsonl:1: rows look like SFT data (messages: keys messages)")
    prefs.jsonl("p.jsonl", TRL_ROWS)
    with pytest.raises(InputError) as err:
        prefs.stage("preference.format=sharegpt")
    assert err.value.message == "data/p.jsonl:1: --format sharegpt does not match the file: rows look like trl"
    with pytest.raises(ConfigError) as err:
        prefs.stage("preference.name=sft")
    assert "preference.name 'sft' is also data.name" in err.value.message


def test_no_usable_pairs_exits_2_through_the_cli(prefs):
    prefs.jsonl("p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a"}])
    result = run_cli("preprocess-dpo", "--config", str(prefs.root / "config.yaml"), cwd=prefs.root,
                     env={"FTPIPE_ENV": "train"}, timeout=300)
    assert result.code == 2, result.output
    assert "data/p.jsonl:1: chosen: the same text as rejected: nothing to prefer" in result.output
    assert "data/p.jsonl:2: rejected: missing" in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: data/p.jsonl: no usable preference pairs (2 read; dropped: 1 invalid (first: data/p.jsonl:2 rejected), "
        "1 identical (first: data/p.jsonl:1 chosen)) (next: fix the rows named above (or pass --format), then: "
        "ftpipe preprocess-dpo --source data/p.jsonl)"], result.output
    assert "Traceback" not in result.output
    assert not (prefs.root / "prepared/prefs/train.jsonl").exists()


def test_format_is_read_from_the_first_row_with_a_known_shape(prefs):
    prefs.jsonl("p.jsonl", [{"prompt": "q"}, *SHAREGPT])  # a broken first row stays that row's error
    prefs.stage()
    assert prefs.metadata()["format"] == "sharegpt" and len(prefs.out()) == 2
    assert prefs.metadata()["errors"]["first"] == ["data/p.jsonl:1: conversations: missing"]
