"""What the family tier (tests/e2e/test_family_matrix.py) and its docs check share: the stages
of a row, the refusals by design, where results go, and the docs table rendered from them."""

from __future__ import annotations

from conftest import FAMILY_NAMES, REPO

STAGES = ("preprocess-sft", "finetune-sft", "export-merged", "convert-awq", "eval-sft", "export-gguf",
          "ollama-template", "serve+smoke", "report")
# Cells that are a refusal by design: (stage, words of the one-line error).
REFUSALS: dict[tuple[str, str], str] = {
    ("gemma", "convert-awq"): "architecture Gemma4ForCausalLM has no AWQ mapping in llm-compressor",
}
RESULTS = REPO / "build" / "family-matrix.json"


def render_table(data: dict) -> str:
    head = "| family | " + " | ".join(STAGES) + " |"
    lines = ["<!-- matrix -->", head, "|" + "---|" * (len(STAGES) + 1)]
    for name in FAMILY_NAMES:
        cells = []
        for stage in STAGES:
            cell = data[name][stage]
            cells.append("ok" if cell["code"] == 0 else f"refused ({REFUSALS.get((name, stage), 'exit %d' % cell['code'])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("<!-- /matrix -->")
    return "\n".join(lines)
