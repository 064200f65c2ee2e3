"""Which tokens perplexity scores: the assistant's, with and without `{% generation %}` tags."""

from __future__ import annotations

from ftpipe.handoff.measure import assistant_mask
from ftpipe.training.tiny_model import CHAT_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "Label it."},
    {"role": "user", "content": "Great kettle."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Awful sofa."},
    {"role": "assistant", "content": "negative"},
]


def _scored(tok, ids, mask) -> str:
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_generation_tags_mask(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask, method = assistant_mask(tok, CONVERSATION, 2048)
    assert method == "generation-tags"
    assert len(ids) == len(mask)
    assert _scored(tok, ids, mask) == "positive<|im_end|>negative<|im_end|>"


def test_prefix_diff_mask_for_templates_without_tags(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask, method = assistant_mask(tok, CONVERSATION, 2048)
    assert method == "prefix-diff"
    # Each assistant turn as it is rendered (its end-of-turn token and newline included).
    assert _scored(tok, ids, mask) == "positive<|im_end|>\nnegative<|im_end|>\n"


def test_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask, _ = assistant_mask(tok, CONVERSATION, 5)
    assert len(ids) == len(mask) == 5
