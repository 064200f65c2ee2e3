"""Serving throughput: the vLLM OpenAI server under concurrent requests vs sequential
transformers `generate`, on the same model, in the same run (same prompts, same token budget).

Runs in the serve environment (vLLM + transformers):

    .venv-serve/bin/python bench/serve.py                                  # a tiny model, built here
    .venv-serve/bin/python bench/serve.py --model outputs/<run>/merged --requests 64 --concurrency 32

Every request generates exactly --max-tokens tokens (vLLM `ignore_eos`, transformers
`min_new_tokens`), so both sides do the same work. Prints one table: tokens/s and the speed-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftpipe.core.runs import Project
from ftpipe.serve.config import ServeConfig
from ftpipe.serve.serve import check_port_free, server_environment, stop_process_group, vllm_command, wait_healthy
from ftpipe.serve.served import Served, base_url

PROMPTS = [f"Review {i}: a {adj} and sturdy {thing}, in my opinion." for i, (adj, thing) in enumerate(
    [(a, t) for a in ("lovely", "awful", "great", "flimsy") for t in ("scarf", "speaker", "umbrella", "lamp")])]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_transformers(model_dir: Path, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    """Sequential greedy `generate`, one prompt at a time: (generated tokens, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - enc["input_ids"].shape[1]
    return tokens, time.perf_counter() - start


def bench_vllm(url: str, name: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[int, float]:
    """Concurrent chat completions against the server: (generated tokens, seconds)."""
    import httpx

    def one(prompt: str) -> int:
        body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    one(prompts[0])  # warm-up, not timed
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, prompts))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Model folder (default: build a tiny model).")
    parser.add_argument("--requests", type=int, default=32, help="Number of prompts.")
    parser.add_argument("--concurrency", type=int, default=16, help="Concurrent requests to vLLM.")
    parser.add_argument("--max-tokens", type=int, default=64, help="Tokens generated per request.")
    parser.add_argument("--eager", action="store_true", help="vLLM --enforce-eager (faster start, slower run).")
    parser.add_argument("--startup-timeout", type=float, default=900.0, help="Seconds to wait for /health.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="ftpipe-bench-serve-"))
    model_dir = args.model.resolve() if args.model else work / "tiny"
    if args.model is None:
        from ftpipe.core.config import TinyModelConfig
        from ftpipe.training.tiny_model import build

        build(model_dir, TinyModelConfig(arch="llama", hidden_size=256, intermediate_size=512, num_layers=4))
    prompts = (PROMPTS * (args.requests // len(PROMPTS) + 1))[: args.requests]

    cfg = ServeConfig(port=free_port(), max_model_len=512, startup_timeout=args.startup_timeout,
                      extra_args=["--enforce-eager"] if args.eager else [])
    served = Served("merged", "vllm", str(model_dir), "bench", work, model_dir)
    check_port_free(cfg.host, cfg.port)
    project = Project(work, work, work, work)
    server_log = work / "server.log"
    with open(server_log, "ab") as out:
        proc = subprocess.Popen(vllm_command(sys.executable, served, cfg), env=server_environment(served, cfg),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        startup = wait_healthy(proc, base_url(cfg.host, cfg.port) + "/health", None, cfg.startup_timeout, server_log, project)
        v_tokens, v_seconds = bench_vllm(base_url(cfg.host, cfg.port), "bench", prompts, args.max_tokens, args.concurrency)
    finally:
        stop_process_group(proc.pid, 30)
        proc.wait(timeout=30)
    t_tokens, t_seconds = bench_transformers(model_dir, prompts, args.max_tokens)

    v_rate, t_rate = v_tokens / v_seconds, t_tokens / t_seconds
    print(f"\nmodel {model_dir}  requests {len(prompts)}  max_tokens {args.max_tokens}  "
          f"vLLM startup {startup:.0f}s  threads {os.cpu_count()}")
    print(f"{'backend':<36} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    print(f"{f'vLLM server, {args.concurrency} concurrent':<36} {v_tokens:>7} {v_seconds:>8.1f} {v_rate:>9.1f}")
    print(f"{'transformers generate, sequential':<36} {t_tokens:>7} {t_seconds:>8.1f} {t_rate:>9.1f}")
    print(f"speed-up: {v_rate / t_rate:.1f}x")


if __name__ == "__main__":
    main()
