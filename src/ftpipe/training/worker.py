"""One training process of a multi-process `finetune-sft` (started by torchrun or accelerate launch).

The stage writes logs/<run>/finetune-sft/train_job.json and launches N copies of this module;
each runs the same `ftpipe.training.sft.train(job)` as a single-process run. Rank 0 appends its
log lines to the stage's run.log (`FTPIPE_WORKER_LOG`) and writes the adapter and results.

    torchrun --standalone --nproc_per_node 2 -m ftpipe.training.worker logs/<run>/finetune-sft/train_job.json
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ftpipe.core.errors import FtpipeError
from ftpipe.core.logs import WORKER_LOG_ENV, worker_logging


def main(argv: list[str] | None = None) -> int:
    """Run one worker; returns the exit code (130 after a Ctrl-C checkpoint, 1/2 on errors)."""
    from ftpipe.training.sft import TrainJob, train

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ftpipe.training.worker TRAIN_JOB.json", file=sys.stderr)  # noqa: T201 - process entry point
        return 2
    rank = int(os.environ.get("RANK", "0"))
    worker_logging(os.environ.get(WORKER_LOG_ENV) if rank == 0 else None, prefix=f"[rank {rank}] ")
    try:
        train(TrainJob.read(Path(args[0])))
    except FtpipeError as exc:
        logging.getLogger(__name__).error("rank %d: %s", rank, exc.one_line())
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
