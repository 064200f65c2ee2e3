"""Run `eval-sft`'s measurements in another environment (the AWQ model in `.venv-awq`).

`eval-sft` runs in the train environment; llm-compressor's output loads with the transformers +
compressed-tensors of the awq environment, so the stage writes a spec and runs

    .venv-awq/bin/python -m ftpipe.eval.worker --spec outputs/<run>/eval/awq-spec.json \
        --out outputs/<run>/eval/awq-result.json

and merges the JSON result. The spec is an `ftpipe.eval.spec.EvalSpec` (validated here with the
same model), the result that of `ftpipe.eval.measure.evaluate_spec`. Logs to stderr and, when the
stage names it in FTPIPE_WORKER_LOG, to its run.log (`ftpipe.core.logs.worker_logging`). Exit 0
when the result was written (an artifact may still report `"status": "failed"` in it), 2 with one
line on a bad spec.
"""

from __future__ import annotations

import logging
import sys

from ftpipe.core.errors import FtpipeError
from ftpipe.core.logs import worker_start


def main(argv: list[str] | None = None) -> int:
    args = worker_start(argv, "ftpipe.eval.worker", __doc__, "eval-sft", "result JSON", "[eval worker] ")
    from ftpipe.core.fsutil import atomic_write_json
    from ftpipe.eval.spec import EvalSpec

    try:
        spec = EvalSpec.read(args.spec)
        from ftpipe.eval.measure import evaluate_spec  # torch / transformers: only for a valid spec

        result = evaluate_spec(spec)
    except FtpipeError as exc:  # a bad spec (exit 2) or an unreadable val file
        logging.getLogger(__name__).error("%s", exc.one_line())
        return exc.exit_code
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
