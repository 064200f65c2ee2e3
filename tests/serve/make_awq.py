"""Quantize a tiny model to 4-bit AWQ (W4A16) with llm-compressor, for the serve tests.

Runs in the awq environment (llm-compressor cannot share a venv with vLLM):
    .venv-awq/bin/python tests/serve/make_awq.py SRC_DIR OUT_DIR
"""

import sys
from pathlib import Path

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = Path(sys.argv[1]), Path(sys.argv[2])
# CPU-only: IntermediatesCache.pin_memory raises without an accelerator (see ../shared ENVIRONMENT).
IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
from datasets import Dataset

texts = [f"<|im_start|>user\nReview {i}: a lovely, sturdy scarf.<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n" for i in range(8)]
ds = Dataset.from_dict({"text": texts})
ds = ds.map(lambda row: tok(row["text"], add_special_tokens=False), remove_columns=["text"])
oneshot(
    model=model, dataset=ds,
    recipe=[AWQModifier(duo_scaling=True, n_grid=4), QuantizationModifier(targets=["Linear"], scheme="W4A16", ignore=["lm_head"])],
    max_seq_length=64, num_calibration_samples=8,
)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
for name in ("generation_config.json", "chat_template.jinja"):
    if (src / name).exists() and not (out / name).exists():
        (out / name).write_bytes((src / name).read_bytes())
print("awq ->", out)
