"""One perplexity (assistant tokens) and one greedy decoding, for convert-awq and eval-sft alike."""

from __future__ import annotations

import math

import pytest

import ftpipe.eval.measure as eval_measure
import ftpipe.export.awq_quality as awq_quality
import ftpipe.export.convert_awq as convert_awq
from ftpipe.handoff import measure
from ftpipe.handoff.prepared import prompt

CONVERSATIONS = [
    [
        {"role": "system", "content": "Label the sentiment of the review as positive or negative."},
        {"role": "user", "content": "The kettle was broken and terrible."},
        {"role": "assistant", "content": "negative"},
    ],
    [
        {"role": "user", "content": "Great kettle."},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "Awful sofa, sadly."},
        {"role": "assistant", "content": "negative"},
    ],
]


def test_convert_awq_and_eval_sft_use_the_same_functions():
    assert convert_awq.perplexity is eval_measure.perplexity is measure.perplexity
    assert convert_awq.greedy is measure.greedy and eval_measure.generate is measure.generate
    # No second definition left in convert-awq's helpers.
    assert not hasattr(awq_quality, "perplexity") and not hasattr(awq_quality, "greedy")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_perplexity_scores_assistant_tokens_only(model_and_tokenizer):
    import torch
    import torch.nn.functional as F

    model, tok = model_and_tokenizer
    result = measure.perplexity(model, tok, CONVERSATIONS, 2048, 4096)
    # The reference: each conversation alone, NLL summed over its masked (assistant) positions.
    total, count = 0.0, 0
    for messages in CONVERSATIONS:
        ids, mask, _ = measure.assistant_mask(tok, messages, 2048)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        nll = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    assert result["assistant_tokens"] == count and result["val_rows"] == 2
    assert count < sum(len(measure.assistant_mask(tok, m, 2048)[0]) for m in CONVERSATIONS) - 2  # not every token
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    # Batching (one row per batch vs both rows padded together) does not change it.
    assert measure.perplexity(model, tok, CONVERSATIONS, 2048, 1)["perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)


def test_greedy_and_generate_are_one_decoding(model_and_tokenizer):
    model, tok = model_and_tokenizer
    messages = prompt(CONVERSATIONS[1])
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    new, stopped = measure.greedy(model, tok, list(ids), 6)
    assert 0 < len(new) <= 6
    assert stopped == (tok.eos_token_id in new)
    if not stopped:
        assert len(new) == 6
    assert measure.generate(model, tok, messages, 6) == (tok.decode(new, skip_special_tokens=True).strip(), stopped, len(new))
    # Greedy: the first new token is the argmax of the next-token logits.
    import torch

    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([list(ids)])).logits[0, -1].argmax())
    assert new[0] == first
