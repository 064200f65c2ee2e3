"""The preprocess-sft stage: outputs, manifest, skipping, filtering, splitting, token counts."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tracemalloc

import pytest

from conftest import REPO
from ftpipe.core.errors import InputError
from ftpipe.data.readers import Source, read_jsonl


def chat(user, answer, system="Answer briefly."):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def test_demo_data_cli_manifest_and_skip(proj):
    shutil.copy(REPO / "data/demo/sentiment.jsonl", proj.root / "data/in.jsonl")
    first = proj.cli()
    assert first.code == 0, first.output
    assert "prepared/ds/: 720 train + 80 val rows (0 dropped, 0 truncated)" in first.output
    meta = proj.metadata()
    assert meta["counts"] == {"read": 800, "kept": 800, "train": 720, "val": 80, "truncated": 0, "chunked": 0, "chunks": 0,
                              "dropped": {"invalid": 0, "duplicate": 0, "too_long": 0, "over_limit": 0}}
    assert meta["format"] == "messages" and meta["source"]["path"] == "data/in.jsonl"
    tokens = meta["tokens"]
    assert tokens["rows"] == 800 and tokens["min"] <= tokens["p50"] <= tokens["p95"] <= tokens["max"] <= 256
    assert sum(tokens["histogram"]["counts"]) == 800 and tokens["histogram"]["edges"][-1] == 256
    assert meta["tokenizer"]["class"] and len(meta["tokenizer"]["chat_template_sha256"]) == 64
    manifest = json.loads((proj.root / "logs/_prepared/ds/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stage"] == "preprocess-sft"
    assert manifest["environment"]["stage_environment"] == "train"
    assert {o["path"] for o in manifest["outputs"]} == {"prepared/ds/train.jsonl", "prepared/ds/val.jsonl", "prepared/ds/metadata.json"}
    assert manifest["inputs"]["source"]["path"] == "data/in.jsonl"
    by_path = {o["path"]: o["sha256"] for o in manifest["outputs"]}
    assert meta["outputs"]["train.jsonl"]["sha256"] == by_path["prepared/ds/train.jsonl"]
    train_before = (proj.root / "prepared/ds/train.jsonl").read_bytes()

    second = proj.cli()
    assert second.code == 0 and "preprocess-sft: up to date, skipped (use --force to rerun)" in second.output
    forced = proj.cli("--force")
    assert forced.code == 0 and "skipped" not in forced.output
    assert (proj.root / "prepared/ds/train.jsonl").read_bytes() == train_before  # deterministic split
    proj.stage("preprocess.seed=7")
    assert (proj.root / "prepared/ds/train.jsonl").read_bytes() != train_before


def test_bad_rows_dropped_counted_and_first_n_shown(proj, caplog):
    rows = [chat(f"q{i}", f"a{i}") for i in range(6)] + [chat("q0", "a0"), chat("q1", "a1")]
    lines = [json.dumps(r) for r in rows] + ['{"messages": [}', json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                                              json.dumps({"messages": "nope"})]
    proj.write("in.jsonl", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="ftpipe"):
        result = proj.stage("preprocess.errors_shown=2", "preprocess.val_fraction=0.0")
    meta = proj.metadata()
    assert meta["counts"]["dropped"] == {"invalid": 3, "duplicate": 2, "too_long": 0, "over_limit": 0}
    assert meta["errors"] == {"count": 3, "first": [
        "data/in.jsonl:9: <line>: not valid JSON: Expecting value at column 15",
        "data/in.jsonl:10: messages: no assistant message: nothing to learn from this row",
        "data/in.jsonl:11: messages: expected a non-empty list of messages, got string",
    ]}
    shown = [r.getMessage() for r in caplog.records if r.name == "ftpipe.data.preprocess_sft"]
    assert shown[:2] == meta["errors"]["first"][:2]
    assert "3 bad rows dropped (first 2 shown above; all counted in metadata.json)" in shown
    assert result.metrics["dropped_invalid"] == 3 and result.metrics["rows_kept"] == 6


def test_token_counts_match_the_chat_template(proj, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [chat(f"question number {i} about <b>tags</b> and  spaces ", "yes" if i % 2 else " no\n") for i in range(40)]
    rows.append({"messages": [{"role": "user", "content": "<|im_end|> inside"}, {"role": "assistant", "content": "ok"}]})
    proj.jsonl("in.jsonl", rows)
    proj.stage("preprocess.val_fraction=0.0", "preprocess.dedupe=false")
    fast = proj.metadata()["tokens"]
    want = sorted(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows)
    assert fast["total"] == sum(want) and fast["max"] == want[-1] and fast["min"] == want[0]
    assert proj.metadata()["render"]["segmented"] > 0
    proj.stage("preprocess.val_fraction=0.0", "preprocess.dedupe=false", "preprocess.fast_render=false")
    slow = proj.metadata()
    assert slow["tokens"] == fast and slow["render"]["segmented"] == 0


def test_overlength_drop_and_truncate(proj):
    long_answer = "word " * 300
    multi = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "short"},
                          {"role": "user", "content": "second"}, {"role": "assistant", "content": long_answer}]}
    single = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]}
    proj.jsonl("in.jsonl", [chat("ok", "ok"), multi, single])
    proj.stage("preprocess.val_fraction=0.0", "preprocess.max_length=64")
    assert proj.metadata()["counts"]["dropped"]["too_long"] == 2
    proj.stage("preprocess.val_fraction=0.0", "preprocess.max_length=64", "preprocess.overlength=truncate")
    meta = proj.metadata()
    assert meta["counts"]["truncated"] == 1 and meta["counts"]["dropped"]["too_long"] == 1
    assert proj.out("train")[1]["messages"] == multi["messages"][:2]
    assert meta["tokens"]["max"] <= 64


def test_limit_sample_and_val_source(proj):
    proj.jsonl("in.jsonl", [chat(f"q{i}", f"a{i}") for i in range(50)])
    proj.stage("preprocess.limit=10", "preprocess.val_fraction=0.2")
    assert [r["messages"][1]["content"] for r in proj.out("train") + proj.out("val")] != []
    users = sorted(int(r["messages"][1]["content"][1:]) for r in proj.out("train") + proj.out("val"))
    assert users == list(range(10)) and len(proj.out("val")) == 2
    assert proj.metadata()["counts"]["dropped"]["over_limit"] == 40
    proj.stage("preprocess.limit=10", "preprocess.sample=true")
    sampled = sorted(int(r["messages"][1]["content"][1:]) for r in proj.out("train") + proj.out("val"))
    assert len(sampled) == 10 and sampled != list(range(10))
    proj.stage("preprocess.limit=10", "preprocess.sample=true")
    assert sorted(int(r["messages"][1]["content"][1:]) for r in proj.out("train") + proj.out("val")) == sampled

    proj.jsonl("val.jsonl", [chat("v1", "w1"), chat("q3", "a3")])  # q3 is in train: dropped as duplicate
    proj.stage("data.val_source=data/val.jsonl")
    assert [r["messages"][1]["content"] for r in proj.out("val")] == ["v1"]
    meta = proj.metadata()
    assert len(proj.out("train")) == 50 and meta["counts"]["dropped"]["duplicate"] == 1
    assert meta["val_source"]["path"] == "data/val.jsonl"


def test_progress_callback_and_streaming_reader(proj, tmp_path):
    proj.jsonl("in.jsonl", [chat(f"q{i}", "a") for i in range(20)])
    calls = []
    proj.stage(progress=lambda done, total: calls.append((done, total)))
    size = (proj.root / "data/in.jsonl").stat().st_size
    assert calls[-1] == (size, size)

    big = tmp_path / "big.jsonl"
    line = json.dumps(chat("x" * 200, "y")) + "\n"
    with open(big, "w") as fh:
        fh.writelines(line for _ in range(20000))
    tracemalloc.start()
    count = sum(1 for _ in read_jsonl(Source(big, "big.jsonl")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 20000 and peak < big.stat().st_size / 20  # one line at a time, not the file


@pytest.mark.slow
def test_bench_runs_on_a_few_rows(tmp_path, tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/preprocess.py"), "--rows", "300", "--model", str(tiny_model_dir),
         "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ftpipe (0 workers)" in out and "ftpipe in-process" in out and "datasets.map " in out
    assert "round 1:" in out and "round 2:" in out and "cold tokenizer cache" in out
    assert re.search(r"speed-up vs datasets.map \(rows/s, target >= 3x\): ftpipe [0-9.]+x", out), out


def test_renderer_counts_survive_cache_overflow(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from ftpipe.data import render

    monkeypatch.setattr(render, "CACHE_ROWS", 2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [chat(f"q{i}", ["yes", "no", "maybe"][i % 3], system=f"s{i % 4}")["messages"] for i in range(60)]
    renderer = render.Renderer(tok)
    got = []
    for start in range(0, 60, 7):
        got += renderer.measure([{"messages": m} for m in rows[start:start + 7]])
    assert got == [len(tok.apply_chat_template(m, tokenize=True, return_dict=False)) for m in rows]
    assert renderer.stats["segmented"] > 0


def test_dedupe_filter_across_merges(monkeypatch):
    from ftpipe.data.preprocess_sft import Seen

    monkeypatch.setattr(Seen, "MERGE", 5)
    seen = Seen()
    keys = [7, -3, 2**62, 7, 11, 5, 9, -3, 100, 2**62, 13, 14, 15, 100, 16]
    assert [seen.add(k) for k in keys] == [True, True, True, False, True, True, True, False, True, False,
                                           True, True, True, False, True]
    assert seen.sorted.size == 10 and list(seen.sorted) == sorted(seen.sorted)


def test_progress_bar_in_a_terminal(proj):
    """In a real terminal the CLI draws a progress bar and finishes (a rich Live that redirected
    stdout through ftpipe's tee console used to hang)."""
    import os
    import pty
    import select
    import time

    shutil.copy(REPO / "data/demo/sentiment.jsonl", proj.root / "data/in.jsonl")
    master, slave = pty.openpty()
    env = {**os.environ, "FTPIPE_ENV": "train", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "ftpipe", "preprocess-sft", "--config", str(proj.root / "config.yaml")],
                            stdin=slave, stdout=slave, stderr=slave, cwd=proj.root, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + 240
    while time.time() < deadline:
        if select.select([master], [], [], 1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    try:
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert code == 0, text[-2000:]
    assert "reading" in text and "720 train + 80 val rows" in text


def _mixed_rows(n: int) -> list[str]:
    """Good rows, duplicates far apart, bad JSON, invalid rows and over-long multi-turn rows."""
    lines = []
    for i in range(n):
        if i % 97 == 0:
            lines.append('{"messages": [}')
        elif i % 89 == 0:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"only a question {i}"}]}))
        elif i % 53 == 0:
            lines.append(json.dumps(chat(f"q{i % 5}", "a")))  # duplicates across batches
        elif i % 31 == 0:
            long = " ".join(f"word{j}" for j in range(300))
            lines.append(json.dumps({"messages": [
                {"role": "user", "content": f"short {i}"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": long}, {"role": "assistant", "content": long}]}))
        else:
            lines.append(json.dumps(chat(f"question {i}", f"answer {i % 7}")))
    return lines


def test_worker_processes_give_the_same_output_as_in_process(proj):
    proj.write("in.jsonl", "\n".join(_mixed_rows(6000)) + "\n")
    outputs = {}
    for workers in (0, 2):
        proj.stage(f"data.name=w{workers}", f"preprocess.workers={workers}", "preprocess.overlength=truncate")
        meta = proj.metadata(f"w{workers}")
        assert meta["workers"] == workers
        outputs[workers] = (
            (proj.root / f"prepared/w{workers}/train.jsonl").read_bytes(),
            (proj.root / f"prepared/w{workers}/val.jsonl").read_bytes(),
            meta["counts"], meta["errors"], meta["tokens"], meta["tokenizer"],
        )
    assert outputs[0] == outputs[2]
    counts = outputs[0][2]
    assert counts["read"] == 6000 and counts["truncated"] > 100
    assert counts["dropped"]["duplicate"] > 0 and counts["dropped"]["invalid"] > 100


def test_worker_processes_report_errors_like_in_process(proj):
    good = [json.dumps(chat(f"q{i}", "a")) for i in range(5000)]
    proj.write("in.jsonl", "\n".join(good) + '\n{"messages": [{"role": "user"')  # truncated at the end
    messages = set()
    for workers in (0, 2):
        with pytest.raises(InputError) as err:
            proj.stage(f"preprocess.workers={workers}")
        messages.add(err.value.one_line())
    assert messages == {"data/in.jsonl:5001: truncated JSON: the file ends inside a record (Expecting ',' delimiter)"
                        " (next: the file was cut short: export or copy it again)"}
    proj.write("in.jsonl", "\n".join(good[:4000] + ["[1, 2]"] + good[4000:]) + "\n")
    messages = set()
    for workers in (0, 2):
        with pytest.raises(InputError) as err:
            proj.stage(f"preprocess.workers={workers}", "preprocess.strict=true")
        messages.add(err.value.one_line())
    assert len(messages) == 1 and messages.pop().startswith("data/in.jsonl:4001: ")


def test_worker_count_is_not_part_of_the_config_hash(proj):
    proj.jsonl("in.jsonl", [chat(f"q{i}", "a") for i in range(50)])
    assert proj.cli().code == 0
    again = proj.cli("--set", "preprocess.workers=2")
    assert again.code == 0 and "preprocess-sft: up to date, skipped" in again.output


def test_automatic_worker_count(tmp_path, monkeypatch):
    from ftpipe.data import rowwork

    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    small.write_text("{}\n")
    with open(big, "wb") as fh:
        fh.truncate(rowwork.AUTO_MIN_BYTES)
    for cores, want_big in ((1, 0), (2, 0), (3, 2), (4, 3), (16, rowwork.AUTO_MAX_WORKERS)):
        monkeypatch.setattr(rowwork.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert rowwork.worker_count(None, big) == want_big, cores
        assert rowwork.worker_count(None, small) == 0
        assert rowwork.worker_count(2, small) == 2  # a setting always wins
