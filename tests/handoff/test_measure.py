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
    assert convert_awq.greedy is measure.greedy and eval_measure.generate_batch is measure.generate_batch
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


# Prompts of different lengths (one to three turns, with and without a system message).
ASKED = [
    [{"role": "user", "content": "Great kettle."}],
    [{"role": "system", "content": "Label the sentiment of the review as positive or negative."},
     {"role": "user", "content": "The kettle was broken and terrible, and the lid came off on the second day of use."}],
    prompt(CONVERSATIONS[1]),
    [{"role": "user", "content": "Awful sofa."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour, please."}],
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def varied(model_and_tokenizer):
    """A copy of the tiny model with noise on every weight: the random model alone repeats one token
    for ever, this one says varied tokens (a stop id in mid-answer is then possible)."""
    import copy

    import torch

    model, tok = model_and_tokenizer
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model, tok


def _ids(tok, messages) -> list[int]:
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture
def one_stops_early(varied, monkeypatch):
    """`varied` with one more end-of-turn id: the 3rd token of the first prompt's answer, which no
    other answer says, so that answer stops after 3 tokens while the others run to MAX_NEW."""
    model, tok = varied
    free = [measure.greedy(model, tok, _ids(tok, messages), MAX_NEW) for messages in ASKED]
    assert all(len(new) == MAX_NEW and not stopped for new, stopped in free), free
    stop = free[0][0][2]
    assert stop not in free[0][0][:2] and all(stop not in new for new, _ in free[1:]), free
    config = model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [*config.eos_token_id, stop])
    return model, tok


@pytest.mark.parametrize("pad", ["pad token", "no pad token"])
def test_batched_generation_is_one_at_a_time_generation(one_stops_early, pad):
    import copy

    model, tok = one_stops_early
    if pad == "no pad token":  # greedy and greedy_batch then pad with an end-of-turn id
        tok = copy.deepcopy(tok)
        tok.pad_token = None
        assert tok.pad_token_id is None
    alone = [measure.generate(model, tok, messages, MAX_NEW) for messages in ASKED]
    assert alone[0][1:] == (True, 3)  # stopped on its 3rd token, counted
    assert all(a[1:] == (False, MAX_NEW) for a in alone[1:])  # ran to max_new_tokens
    assert len({len(_ids(tok, m)) for m in ASKED}) > 2  # padded batches
    for batch_size in (1, 3, len(ASKED) + 4):
        assert measure.generate_batch(model, tok, ASKED, MAX_NEW, batch_size) == alone, batch_size
    # Results come back in the order asked, whatever the batches (sorted by length) were.
    order = (3, 0, 4, 2, 1)
    assert measure.generate_batch(model, tok, [ASKED[i] for i in order], MAX_NEW, 2) == [alone[i] for i in order]
    assert measure.generate_batch(model, tok, [], MAX_NEW, 4) == []


def test_a_stopped_row_does_not_count_what_its_batch_generated_after_its_stop(one_stops_early):
    model, tok = one_stops_early
    prompts = [_ids(tok, m) for m in ASKED]
    batched = measure.greedy_batch(model, tok, prompts, MAX_NEW, len(prompts))
    assert batched == [measure.greedy(model, tok, ids, MAX_NEW) for ids in prompts]
    new, stopped = batched[0]
    assert stopped and len(new) == 3 and new[-1] in measure._stop_ids(model, tok)


def test_batched_generation_through_a_peft_model(varied):
    """A LoRA adapter (non-zero B, so it changes the answers) answers through PeftModel.generate."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    base, tok = varied
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False)).eval()
    alone = [measure.generate(model, tok, messages, MAX_NEW) for messages in ASKED]
    assert alone != [measure.generate(base, tok, messages, MAX_NEW) for messages in ASKED]  # the adapter is on
    assert measure.generate_batch(model, tok, ASKED, MAX_NEW, 3) == alone


def test_a_batch_size_below_one_is_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        measure.greedy_batch(model, tok, [[1, 2]], 4, 0)
