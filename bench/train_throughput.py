"""Training throughput: ftpipe's finetune-sft vs TRL SFTTrainer (defaults, and tuned for the CPU).

On the SmolLM-135M shape (random init, hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate
1536, tied embeddings) with a chosen vocabulary (`--vocab`: 49152 as SmolLM, 151936 as Qwen2.5/3),
the same packed sentiment data, the same LoRA (r 16, all-linear), the same batch (4 x 256 tokens)
and the same number of torch threads, it measures in one run, each trainer in its own process:

- ftpipe: `ftpipe.training.sft.train` with the plan `finetune-sft` picks on this machine
  (precision, base dtype, checkpointing, packing) - the stage's own code path;
- TRL defaults: `SFTTrainer(model=path, args=SFTConfig(...defaults...), peft_config=LoRA)`, with
  only what a CPU needs (`use_cpu=True`), the batch / length / steps above and packing on so both
  see the same tokens;
- TRL tuned for the CPU: the same, as a careful user would set it on a CPU: fp32 (`bf16=False`),
  gradient checkpointing off, packing on;
- TRL tuned, bf16: the same with TRL's default `bf16=True` kept (the better choice on a CPU with
  native bf16, `avx512_bf16` / `amx_bf16`; emulated and slow elsewhere: `--baselines` leaves it out);
- fp32 and bf16 matmul peaks (GFLOP/s) with torch.mm on this machine.

The trainers run in `--rounds` rounds, the order reversed every other round (the host's speed
drifts between minutes); every round is printed, and the summary takes each trainer's fastest
round (tokens/s, and the peak RSS of that round) and compares ftpipe with the strongest baseline.
Steady-state tokens/s exclude the first two optimizer steps (warm-up); peak RSS is the process's
ru_maxrss. Model FLOPs per token for LoRA = 4 x matmul parameters (forward 2N, backward through
frozen weights 2N) + 6 x LoRA parameters, attention scores ignored (short packed documents).

    .venv/bin/python bench/train_throughput.py                     # ~6 minutes on 2 cores
    .venv/bin/python bench/train_throughput.py --vocab 151936      # the Qwen-sized LM head (~7 minutes)
    .venv/bin/python bench/train_throughput.py --steps 4 --threads 1 --json bench.json
    .venv/bin/python bench/train_throughput.py --steps 4 --threads 1 --only ftpipe --checkpointing on

Measured numbers and what they mean: docs/finetune.md ("Speed and memory").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048)
WARMUP_STEPS = 2
TRAINERS = {"ftpipe": "ftpipe", "trl-cpu": "TRL tuned for the CPU", "trl-cpu-bf16": "TRL tuned, bf16",
            "trl": "TRL defaults"}
BASELINES = ("trl-cpu", "trl-cpu-bf16", "trl")


def build_model(out: Path, vocab: int, layers: int) -> None:
    """Random-init 135M-shape Llama + a locally trained tokenizer (ids < 8k; the vocab stays `vocab`)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(TinyModelConfig(vocab_size=8192), [REPO / "data/demo/sentiment.jsonl"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|pad|>")}
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, vocab_size=vocab, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|pad|>"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_data(out: Path) -> Path:
    rows = (REPO / "data/demo/sentiment.jsonl").read_text(encoding="utf-8").splitlines()
    path = out / "train.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def matmul_peak(dtype_name: str, threads: int, seconds: float = 3.0) -> float:
    """GFLOP/s of repeated 1024 x 1024 x 1024 matmuls in `dtype_name`."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    for _ in range(3):
        torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def flops_per_token(model_dir: Path, lora_params: int) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    matmul = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + lm_head
    return 4.0 * matmul + 6.0 * lora_params


def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.tokens0 = None
            self.t1 = self.tokens1 = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen
            elif state.global_step > WARMUP_STEPS:
                self.t1, self.tokens1 = time.perf_counter(), state.num_input_tokens_seen

        def result(self) -> dict:
            return {"tokens_per_s": (self.tokens1 - self.tokens0) / (self.t1 - self.t0),
                    "timed_steps_tokens": self.tokens1 - self.tokens0}

    return Timer()


def worker_ftpipe(model_dir: Path, data: Path, out: Path, args) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from ftpipe.handoff.prepared import read_training_rows
    from ftpipe.training.config import FinetuneConfig
    from ftpipe.training.finetune_sft import _sample_lengths
    from ftpipe.training.plan import make_plan
    from ftpipe.training.sft import TrainJob, train

    ft = FinetuneConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.seq, lora_r=16,
                        lora_alpha=32, lora_dropout=0.0, logging_steps=1, save_steps=10**6, warmup_ratio=0.0,
                        gradient_checkpointing=args.checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plan = make_plan(ft, AutoConfig.from_pretrained(model_dir), ft.method,
                     _sample_lengths(tokenizer, read_training_rows(data)[:200]))
    job = TrainJob(finetune=ft, plan=plan, load_from=str(model_dir), model_kwargs={},
                   base_model_record={"id": None, "revision": None, "path": str(model_dir)}, train_file=str(data),
                   val_file=None, output_dir=str(out / "state"), final_dir=str(out / "adapter"), resume_from=None,
                   run_name="bench")
    timer = _timer()
    metrics = train(job, extra_callbacks=[timer])
    return {**timer.result(), "lora_params": metrics["trainable_parameters"],
            "setup": {k: plan.record()[k] for k in ("precision", "base_dtype", "gradient_checkpointing", "packing")}}


def worker_trl(model_dir: Path, data: Path, out: Path, args, kind: str) -> dict:
    """TRL's SFTTrainer with its defaults (`trl`), or as a careful user sets it up for a CPU (`trl-cpu*`)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ftpipe.handoff.prepared import read_training_rows

    cpu_settings = {"trl": {}, "trl-cpu": {"bf16": False, "gradient_checkpointing": False},
                    "trl-cpu-bf16": {"gradient_checkpointing": False}}[kind]
    config = SFTConfig(output_dir=str(out / "trl"), use_cpu=True, max_length=args.seq, packing=True,
                       per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=2e-4,
                       logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                       include_num_input_tokens_seen="non_padding", **cpu_settings)
    timer = _timer()
    trainer = SFTTrainer(model=str(model_dir), args=config, train_dataset=Dataset.from_list(read_training_rows(data)),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[timer])
    trainer.train()
    return {**timer.result(), "setup": {"precision": "bf16" if config.bf16 else "fp32",
                                        "gradient_checkpointing": config.gradient_checkpointing, "packing": True}}


def run_worker(kind: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir), "--data", str(data),
           "--work", str(work), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq",
           str(args.seq), "--threads", str(args.threads), "--checkpointing", args.checkpointing]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict[str, dict]], peaks: dict[str, float], fpt: float, args) -> tuple[dict, list[str]]:
    """The summary (JSON) and its lines: each trainer's fastest round, ftpipe against the strongest baseline.

    Args:
        rounds: per round, trainer -> worker result (tokens_per_s, peak_rss_mb, setup).
        peaks: best fp32 / bf16 matmul GFLOP/s ("float32", "bfloat16").
        fpt: model FLOPs per token.
    """
    best = {kind: max((r[kind] for r in rounds if kind in r), key=lambda x: x["tokens_per_s"])
            for kind in TRAINERS if any(kind in r for r in rounds)}
    ft = best["ftpipe"]
    strongest = max((k for k in BASELINES if k in best), key=lambda k: best[k]["tokens_per_s"])
    precision = ft["setup"]["precision"]
    peak = peaks["bfloat16"] if precision == "bf16" else peaks["float32"]
    model_gflops = ft["tokens_per_s"] * fpt / 1e9
    summary = {
        "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size, "seq": args.seq,
        "vocab": args.vocab, "layers": args.layers, "rounds": rounds, "matmul_peak_gflops": peaks,
        "flops_per_token": fpt, "ftpipe": ft, "strongest_baseline": strongest,
        "model_gflops": model_gflops, "fraction_of_peak": model_gflops / peak, "peak_precision": precision,
    }
    lines = [f"best round of each (vocab {args.vocab}, {args.threads} threads, batch {args.batch_size} x {args.seq}):"]
    for kind, result in best.items():
        lines.append(f"  {TRAINERS[kind]:<22} {result['tokens_per_s']:7.1f} tok/s  "
                     f"peak RSS {result['peak_rss_mb']:5.0f} MB  {result['setup']}")
    for kind in BASELINES:
        if kind not in best:
            continue
        key = kind.replace("-", "_")
        summary[key] = best[kind]
        summary[f"speedup_vs_{key}"] = ft["tokens_per_s"] / best[kind]["tokens_per_s"]
        summary[f"rss_ratio_vs_{key}"] = ft["peak_rss_mb"] / best[kind]["peak_rss_mb"]
        lines.append(f"ftpipe vs {TRAINERS[kind]}{' (strongest baseline)' if kind == strongest else ''}: "
                     f"{summary[f'speedup_vs_{key}']:.2f}x tokens/s, {summary[f'rss_ratio_vs_{key}']:.2f}x peak RSS")
    key = strongest.replace("-", "_")
    summary["speedup_vs_strongest"] = summary[f"speedup_vs_{key}"]
    summary["rss_ratio_vs_strongest"] = summary[f"rss_ratio_vs_{key}"]
    lines += [
        f"summary vs the strongest baseline ({TRAINERS[strongest]}): tokens/s {summary['speedup_vs_strongest']:.2f}x "
        f"(target >= 2.0x), peak RSS {summary['rss_ratio_vs_strongest']:.2f}x (target <= 0.5x)",
        f"model FLOPs {model_gflops:.1f} GFLOP/s = {summary['fraction_of_peak']:.0%} of the {precision} matmul peak "
        f"{peak:.1f} GFLOP/s (target >= 60%)",
    ]
    return summary, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer (2 are warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152,
                        help="vocabulary size of the model (49152: SmolLM; 151936: Qwen2.5/Qwen3)")
    parser.add_argument("--layers", type=int, default=30,
                        help="decoder layers (30: the 135M shape; fewer for a quick check)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of all trainers, the order reversed every other round")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="finetune.gradient_checkpointing for the ftpipe run (auto = what the stage picks)")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                        help="the baselines to run next to ftpipe")
    parser.add_argument("--only", choices=list(TRAINERS), help="measure one trainer (no ratios)")
    parser.add_argument("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be > {WARMUP_STEPS + 1}")

    if args.worker:
        import logging

        import torch

        logging.disable(logging.WARNING)
        torch.set_num_threads(args.threads)
        if args.worker == "ftpipe":
            result = worker_ftpipe(args.model_dir, args.data, args.work, args)
        else:
            result = worker_trl(args.model_dir, args.data, args.work, args, args.worker)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))  # noqa: T201 - bench output
        return

    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-") as tmp:
        work = Path(tmp)
        print(f"building the 135M-shape model (vocab {args.vocab}, {args.layers} layers) in {work} ...",  # noqa: T201
              flush=True)
        build_model(work / "model", args.vocab, args.layers)
        data = write_data(work)
        peaks = {name: matmul_peak(name, args.threads) for name in ("float32", "bfloat16")}
        print(f"matmul peak ({args.threads} threads): fp32 {peaks['float32']:.1f} GFLOP/s, "  # noqa: T201
              f"bf16 {peaks['bfloat16']:.1f} GFLOP/s", flush=True)
        rounds: list[dict[str, dict]] = []
        order = [args.only] if args.only else ["ftpipe", *(k for k in BASELINES if k in args.baselines)]
        for round_no in range(1, args.rounds + 1):
            results: dict[str, dict] = {}
            for kind in order if round_no % 2 else order[::-1]:
                print(f"round {round_no}: {TRAINERS[kind]} ({args.steps} steps) ...", flush=True)  # noqa: T201
                out = work / f"round{round_no}-{kind}"  # a fresh output folder per run
                out.mkdir()
                results[kind] = run_worker(kind, work / "model", data, out, args)
                print(f"  {TRAINERS[kind]}: {results[kind]['tokens_per_s']:.1f} tokens/s, peak RSS "  # noqa: T201
                      f"{results[kind]['peak_rss_mb']:.0f} MB, {results[kind]['setup']}", flush=True)
            rounds.append(results)
            if not args.only:
                ratios = ", ".join(f"{results['ftpipe']['tokens_per_s'] / results[k]['tokens_per_s']:.2f}x "
                                   f"{TRAINERS[k]}" for k in order[1:])
                print(f"round {round_no}: ftpipe tokens/s = {ratios}", flush=True)  # noqa: T201
        if args.only:
            return
        fpt = flops_per_token(work / "model", rounds[0]["ftpipe"]["lora_params"])
        # The machine may be shared: measure the peaks again and keep the best (a conservative ratio).
        for name in peaks:
            peaks[name] = max(peaks[name], matmul_peak(name, args.threads))
        print(f"matmul peak, best of two: fp32 {peaks['float32']:.1f} GFLOP/s, "  # noqa: T201
              f"bf16 {peaks['bfloat16']:.1f} GFLOP/s", flush=True)

    summary, lines = summarize(rounds, peaks, fpt, args)
    print("\n" + "\n".join(lines))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
