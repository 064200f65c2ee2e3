"""Benchmark `preprocess-sft` against a `datasets.map` tokenization of the same file.

Writes an N-row messages JSONL (the demo rows, each made unique), then in separate processes
(so each peak memory is its own): ftpipe's stage on N/10 rows twice (tokenizer cache cold, then
warm: ftpipe/data/tokenizer_cache.py), then `--repeat` alternated rounds of ftpipe on N rows (default workers setting, and in-process when
that chose workers) and `datasets.load_dataset("json") + .map(apply_chat_template, batched=True)`
(the baseline). The host's speed drifts between minutes, so each round's ratio is printed and the
summary takes each side's fastest round: rows/s, CPU seconds, the speed-up and peak memory (PSS
summed over each process tree), and ftpipe's peak memory at N/10 rows to show memory stays flat in
rows. Then the cost of one big row: 100 demo rows plus one 10 MiB row (refused by
`preprocess.max_row_bytes` before it is parsed), and plus one row just under the default limit
(1 MiB, tokenized). Not part of the test suite (a test runs it on a few rows so it cannot rot).

    .venv/bin/python bench/preprocess.py --rows 1000000
    .venv/bin/python bench/preprocess.py --rows 20000 --model models/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "sentiment.jsonl"

BASELINE = r"""
import sys, datasets
from transformers import AutoTokenizer
datasets.disable_progress_bars()
src, model, cache = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(model)
ds = datasets.load_dataset("json", data_files=src, split="train", cache_dir=cache)
def count(batch):
    ids = tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)
    return {"n_tokens": [len(x) for x in ids]}
ds = ds.map(count, batched=True, batch_size=1000, remove_columns=ds.column_names,
            cache_file_name=cache + "/map.arrow", load_from_cache_file=False)
print(len(ds), sum(ds["n_tokens"]))
"""


def make_data(path: Path, rows: int) -> None:
    """An N-row messages JSONL: the demo rows cycled, each user turn made unique."""
    base = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            row = base[i % len(base)]
            msgs = [dict(m) for m in row["messages"]]
            msgs[1]["content"] = f"{msgs[1]['content']} (review {i})"
            fh.write(json.dumps({"messages": msgs}) + "\n")


def make_big_row(path: Path, size: int) -> None:
    """100 demo rows and one messages row whose JSON line is about `size` bytes (the user turn)."""
    base = [line for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()][:100]
    big = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "ok"}]}
    big["messages"][0]["content"] = "word " * ((size - len(json.dumps(big)) - 1) // 5)
    path.write_text("\n".join([*base, json.dumps(big)]) + "\n", encoding="utf-8")


def timed(argv: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak memory (PSS) in MiB, stdout) of a child process and every process it starts.

    Peak memory is the peak of the sum over the process tree (ftpipe's worker processes count) of
    each process's PSS (proportional set size: pages shared between the forked workers, such as
    torch's libraries, counted once, split between them); the tree's CPU seconds go to CPU. Both are
    sampled every 0.1 s with psutil; a single process's PSS is at most its RSS.
    """
    import threading

    import psutil

    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak, cpu, done = [0], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = 0
            for p in tree:
                try:
                    with p.oneshot():
                        rss += p.memory_full_info().pss
                        t = p.cpu_times()
                        cpu[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            peak[0] = max(peak[0], rss)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    seconds = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{out[-2000:]}")
    cpu[proc.pid] = usage.ru_utime + usage.ru_stime  # exact for the main process
    CPU.append(sum(cpu.values()))
    return seconds, peak[0] / 2**20, out


CPU: list[float] = []  # CPU seconds of each timed process tree: fairer than wall time on a shared machine


def ftpipe_run(work: Path, model: Path, source: Path, rows: int, env: dict, workers: str = "null") -> tuple[float, float, dict]:
    cfg = work / f"config-{rows}.yaml"
    cfg.write_text(
        f"model:\n  path: {model}\ndata:\n  name: bench{rows}\n  source: {source}\n"
        f"preprocess:\n  max_length: 256\n  workers: {workers}\n", encoding="utf-8",
    )
    seconds, rss, _ = timed([sys.executable, "-m", "ftpipe", "preprocess-sft", "--config", str(cfg), "--force"], work, env)
    meta = json.loads((work / "prepared" / f"bench{rows}" / "metadata.json").read_text())
    return seconds, rss, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the benchmark file")
    parser.add_argument("--model", type=Path, help="model folder with a chat template (default: build a tiny one)")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temp folder, removed)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of (ftpipe, baseline), alternated")
    parser.add_argument("--skip-baseline", action="store_true", help="only time ftpipe")
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FTPIPE_ENV": "train"}
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model = args.model.resolve() if args.model else work / "tiny"
        if not (model / "config.json").exists():
            from ftpipe.core.config import TinyModelConfig
            from ftpipe.training.tiny_model import build

            build(model, TinyModelConfig(vocab_size=2048), [DEMO])
        small_rows = max(1, args.rows // 10)
        big, small = work / f"rows-{args.rows}.jsonl", work / f"rows-{small_rows}.jsonl"
        make_data(big, args.rows)
        make_data(small, small_rows)
        print(f"file: {args.rows} rows, {big.stat().st_size / 2**20:.1f} MiB; {args.repeat} rounds, alternated "
              "(the host's speed drifts: each round's ratio is printed, the summary uses each side's best round)")

        shutil.rmtree(work / ".cache", ignore_errors=True)  # the first run loads the tokenizer cold
        c_sec, c_rss, _ = ftpipe_run(work, model, small, small_rows, env)
        print(f"ftpipe (N/10, cold tokenizer cache: AutoTokenizer, torch imported) {small_rows / c_sec:.0f} rows/s  "
              f"({c_sec:.1f} s wall)  peak memory {c_rss:.0f} MiB")
        s_sec, s_rss, _ = ftpipe_run(work, model, small, small_rows, env)  # warm, like the N-row runs
        for label, size in (("10 MiB row", 10 * 2**20), ("row just under the 1 MiB limit", 2**20 - 64)):
            path = work / f"big-row-{size}.jsonl"
            make_big_row(path, size)
            r_sec, r_rss, r_meta = ftpipe_run(work, model, path, size, env)
            print(f"ftpipe, 100 rows + one {label}: peak memory {r_rss:.0f} MiB ({r_sec:.1f} s; kept "
                  f"{r_meta['counts']['kept']}, dropped {({k: v for k, v in r_meta['counts']['dropped'].items() if v})})")
        best: dict[str, tuple[float, float, float]] = {}  # side -> (wall s, CPU s, peak MiB) of its fastest round

        def keep(side: str, sec: float, rss: float) -> None:
            if side not in best or sec < best[side][0]:
                best[side] = (sec, CPU[-1], rss)

        for round_no in range(1, args.repeat + 1):
            f_sec, f_rss, meta = ftpipe_run(work, model, big, args.rows, env)
            n_workers = meta["workers"]
            keep("ftpipe", f_sec, f_rss)
            line = f"round {round_no}: ftpipe ({n_workers} workers) {f_sec:.1f} s"
            if n_workers:  # the automatic setting chose workers: time in-process too
                i_sec, i_rss, _ = ftpipe_run(work, model, big, args.rows, env, workers="0")
                keep("in-process", i_sec, i_rss)
                line += f", in-process {i_sec:.1f} s"
            if not args.skip_baseline:
                cache = Path(tempfile.mkdtemp(prefix="hf-cache-", dir=work))  # fresh: never reuse an old map
                b_sec, b_rss, out = timed([sys.executable, "-c", BASELINE, str(big), str(model), str(cache)], work, env)
                shutil.rmtree(cache, ignore_errors=True)
                keep("baseline", b_sec, b_rss)
                line += f", datasets.map {b_sec:.1f} s [{out.strip().splitlines()[-1]}] -> {b_sec / f_sec:.2f}x"
            print(line)

        kept = meta["counts"]["kept"]
        rows = args.rows
        f_sec, f_cpu, f_rss = best["ftpipe"]
        print(f"ftpipe ({n_workers} workers) {rows / f_sec:10.0f} rows/s  ({f_sec:.1f} s wall, {f_cpu:.1f} s CPU, "
              f"{kept} kept)  peak memory {f_rss:.0f} MiB (PSS, all processes)")
        print(f"ftpipe (N/10)      {small_rows / s_sec:10.0f} rows/s  ({s_sec:.1f} s wall)  peak memory {s_rss:.0f} MiB"
              f"  -> memory grows {f_rss - s_rss:.0f} MiB for {rows - small_rows} more rows")
        inproc = best.get("in-process", best["ftpipe"])
        print(f"ftpipe in-process  {rows / inproc[0]:10.0f} rows/s  ({inproc[0]:.1f} s wall, {inproc[1]:.1f} s CPU)  "
              f"peak memory {inproc[2]:.0f} MiB" + ("" if "in-process" in best else "  (the default run: 0 workers)"))
        if args.skip_baseline:
            return
        b_sec, b_cpu, b_rss = best["baseline"]
        print(f"datasets.map       {rows / b_sec:10.0f} rows/s  ({b_sec:.1f} s wall, {b_cpu:.1f} s CPU)  "
              f"peak memory {b_rss:.0f} MiB")
        print(f"speed-up vs datasets.map (rows/s, target >= 3x): ftpipe {b_sec / f_sec:.2f}x "
              f"(in-process {b_sec / inproc[0]:.2f}x); CPU seconds {b_cpu / f_cpu:.2f}x (in-process {b_cpu / inproc[1]:.2f}x); "
              f"peak memory {f_rss / b_rss:.2f}x the baseline's")


if __name__ == "__main__":
    main()
