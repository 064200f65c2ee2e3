"""OpenMP's wait policy when two torch processes share the cores (scripts/test.sh's two workers).

    .venv/bin/python bench/omp_wait_policy.py              # 3 rounds, alternating the two policies
    .venv/bin/python bench/omp_wait_policy.py --rounds 5

The workload (one process): 60 steps of a SmolLM2-sized MLP block (2048 tokens x 576 -> 1536 -> 576,
forward and backward) plus many small matmuls, with torch's default threads (all usable cores). Each
round times it alone and two copies at once, under the baseline (OMP_WAIT_POLICY unset: libgomp spins
before it sleeps) and under OMP_WAIT_POLICY=PASSIVE (threads that wait for work sleep at once), the
two policies alternating. Two at once cannot beat twice the time alone: that bound is printed too.
Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

WORKLOAD = """
import time, torch
torch.manual_seed(0)
x = torch.randn(2048, 576)
w1 = torch.randn(576, 1536, requires_grad=True)
w2 = torch.randn(1536, 576, requires_grad=True)
small = [torch.randn(64, 128, requires_grad=True) for _ in range(8)]
started = time.perf_counter()
for _ in range(60):
    h = torch.nn.functional.silu(x @ w1) @ w2
    s = sum((torch.randn(16, 64) @ p).sum() for p in small)
    (h.square().mean() + s).backward()
print(time.perf_counter() - started)
"""


def timed(copies: int, policy: str | None) -> list[float]:
    """Seconds each of `copies` simultaneous workload processes took under `policy`."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    procs = [subprocess.Popen([sys.executable, "-c", WORKLOAD], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    policies = {"default (spin, then sleep)": None, "PASSIVE": "PASSIVE"}
    alone: dict[str, list[float]] = {name: [] for name in policies}
    pair: dict[str, list[float]] = {name: [] for name in policies}
    timed(1, None)  # warm-up: the first start pays for the page cache
    for round_ in range(args.rounds):
        order = list(policies.items()) if round_ % 2 == 0 else list(reversed(policies.items()))
        for name, policy in order:
            alone[name] += timed(1, policy)
            pair[name] += timed(2, policy)
            print(f"round {round_ + 1} {name:<28} alone {alone[name][-1]:5.1f} s   two at once {pair[name][-2]:5.1f} s "
                  f"{pair[name][-1]:5.1f} s", flush=True)
    print()
    for name in policies:
        a, p = statistics.median(alone[name]), statistics.median(pair[name])
        print(f"{name:<28} median alone {a:5.1f} s, two at once {p:5.1f} s each ({p / a:.2f}x alone; 2.00x is "
              f"sharing without loss)")
    base, passive = (statistics.median(pair[n]) for n in policies)
    print(f"two at once, PASSIVE against the default: {passive / base:.2f}x the time")


if __name__ == "__main__":
    main()
