"""Run `eval-sft`'s measurements in another environment (the AWQ model in `.venv-awq`).

`eval-sft` runs in the train environment; llm-compressor's output loads with the transformers +
compressed-tensors of the awq environment, so the stage writes a spec and runs

    .venv-awq/bin/python -m ftpipe.eval.worker --spec outputs/<run>/eval/awq-spec.json \
        --out outputs/<run>/eval/awq-result.json

and merges the JSON result. The spec and result formats are those of
`ftpipe.eval.measure.evaluate_spec`. Exit 0 when the result was written (an artifact may still
report `"status": "failed"` in it), 2 on a bad spec.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftpipe.eval.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="spec JSON written by eval-sft")
    parser.add_argument("--out", required=True, type=Path, help="where to write the result JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logging.getLogger(__name__).error("%s: cannot read the spec (%s: %s)", args.spec, type(exc).__name__, exc)
        return 2
    from ftpipe.core.fsutil import atomic_write_json
    from ftpipe.eval.measure import evaluate_spec

    atomic_write_json(args.out, evaluate_spec(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
