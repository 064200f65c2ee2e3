"""A stage's manifest for tests that do a stage's work themselves (a real TRL fine-tune, a copied
model standing in for convert-awq's output, ...): `record_stage` runs that work under
`ftpipe.core.stage.execute` with the stage table's own row, so the manifest holds the config hash
the real stage computes (`loaded.section_hash(*stages.get(name).sections)`) and its environment,
never a hand-written section list. Used by tests/eval and tests/serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ftpipe import stages
from ftpipe.core.manifest import Remote
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import StageContext, StageResult, execute


def record_stage(stage: str, loaded, run: RunDir, work: Callable[[StageContext], StageResult],
                 inputs: dict[str, Path | Remote] | None = None) -> StageResult:
    """Run `work(ctx)` as stage `stage` of `run`: manifest `running`, then `completed` with the
    outputs it returns (or `failed`, and its exception re-raised).

    Args:
        stage: a run-scoped stage of the table (finetune-sft, export-merged, convert-awq, ...).
        loaded: the loaded config the manifest records and hashes.
        work: does the stage's work; returns its result (outputs to hash).
        inputs: the inputs to record (default none).
    """
    row = stages.get(stage)
    ctx = StageContext.for_run(stage, loaded, run)
    return execute(ctx, lambda ctx: None, lambda ctx, _plan: work(ctx), sections=row.sections,
                   inputs=inputs or {}, environment=stages.environment_of(row, loaded.config))
