"""Which tokens are the target (finetune-sft's labels, eval's perplexity): each assistant turn's content
and its end-of-turn token, with and without `{% generation %}` tags, for every model family."""

from __future__ import annotations

import logging

import pytest

from ftpipe.handoff.measure import assistant_mask, encode_conversation, end_of_turn_ids
from ftpipe.training.tiny_model import CHAT_TEMPLATE
from tests.conftest import FAMILY_NAMES

CONVERSATION = [
    {"role": "system", "content": "Label it."},
    {"role": "user", "content": "Great kettle."},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Awful sofa."},
    {"role": "assistant", "content": "negative"},
]
SINGLE = [{"role": "user", "content": "Great kettle."}, {"role": "assistant", "content": "positive, surely."}]

# The end-of-turn token each family's template writes after an assistant turn.
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "phi3.5": "<|end|>",
               "mistral": "</s>", "gemma": "<turn|>"}
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"  # what Qwen3's template writes before the last answer


def _spans(tok, ids, mask) -> list[str]:
    """The decoded runs of consecutive masked tokens."""
    spans, run = [], []
    for t, m in zip([*ids, None], [*mask, 0]):
        if m:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


def _expected(family: str, answers: list[str]) -> list[str]:
    eot = END_OF_TURN[family]
    out = [a + eot for a in answers]
    if family == "qwen3":  # the last turn as generated: the empty think block is part of it
        out[-1] = QWEN3_EMPTY_THINK + out[-1]
    return out


def _family_tokenizer(family_model, name):
    from transformers import AutoTokenizer, GenerationConfig

    path = family_model(name)
    return AutoTokenizer.from_pretrained(path), GenerationConfig.from_pretrained(path)


def _shifted(mask: list[int], by: int) -> list[int]:
    """The mask moved `by` tokens (right for positive `by`), wrapping around."""
    return mask[-by:] + mask[:-by]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("conversation,answers", [(SINGLE, ["positive, surely."]),
                                                  (CONVERSATION, ["positive", "negative"])],
                         ids=["single-turn", "multi-turn+system"])
def test_each_family_masks_content_and_end_of_turn(family_model, family, conversation, answers):
    tok, generation = _family_tokenizer(family_model, family)
    e = encode_conversation(tok, conversation, end_ids=end_of_turn_ids(tok, generation))
    assert e.method == "prefix-diff" and e.unlocated == 0 and e.turns == len(answers)
    assert len(e.input_ids) == len(e.mask)
    want = _expected(family, answers)
    assert _spans(tok, e.input_ids, e.mask) == want
    # The comparison is exact to the token: the mask moved by one token either way fails it.
    for by in (1, -1):
        assert _spans(tok, e.input_ids, _shifted(e.mask, by)) != want
    # Same answer from the tokenizer alone (end-of-turn probed from the template).
    assert encode_conversation(tok, conversation).mask == e.mask


def test_qwen3_earlier_think_blocks_are_stripped_from_the_target(family_model):
    """Qwen3 re-renders earlier turns without their reasoning: the target is what the template shows."""
    tok, generation = _family_tokenizer(family_model, "qwen3")
    conversation = [*CONVERSATION[:2], {"role": "assistant", "content": "<think>\nA kettle.\n</think>\n\npositive"},
                    *CONVERSATION[3:]]
    e = encode_conversation(tok, conversation, end_ids=end_of_turn_ids(tok, generation))
    assert _spans(tok, e.input_ids, e.mask) == ["positive<|im_end|>", QWEN3_EMPTY_THINK + "negative<|im_end|>"]


def test_mistral_system_text_moves_to_the_last_user_turn(family_model):
    """Mistral-Nemo puts the system text in the last user message: earlier turns are not prefixes, still found."""
    tok, _ = _family_tokenizer(family_model, "mistral")
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert not full.startswith(tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True))
    ids, mask, _ = assistant_mask(tok, CONVERSATION, None)
    assert _spans(tok, ids, mask) == ["positive</s>", "negative</s>"]


def test_generation_tags_mask(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask, method = assistant_mask(tok, CONVERSATION, 2048)
    assert method == "generation-tags"
    assert len(ids) == len(mask)
    assert _spans(tok, ids, mask) == ["positive<|im_end|>", "negative<|im_end|>"]


def test_prefix_diff_equals_the_generation_tags(tiny_model_dir):
    """ftpipe's ChatML template without its tags: the same target as with them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tagged = assistant_mask(tok, CONVERSATION, 2048)
    tok.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids, mask, method = assistant_mask(tok, CONVERSATION, 2048)
    assert method == "prefix-diff"
    assert (ids, mask) == tagged[:2]


def test_unlocatable_turns_are_counted_and_logged(tiny_model_dir, caplog):
    """A template that renders earlier turns differently AND alters contents: each turn counted, none guessed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                         "{{ m.content|upper }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with caplog.at_level(logging.WARNING, logger="ftpipe.handoff.measure"):
        e = encode_conversation(tok, CONVERSATION)
    assert (e.turns, e.unlocated, sum(e.mask)) == (2, 2, 0)
    assert sum("cannot be located" in r.getMessage() for r in caplog.records) == 2


def test_wrong_end_of_turn_id_leaves_the_turn_out_instead_of_running_on(family_model):
    """Phi-3.5's eos (<|endoftext|>) does not end a turn: an earlier turn is unlocated, never over-long."""
    tok, _ = _family_tokenizer(family_model, "phi3.5")
    e = encode_conversation(tok, CONVERSATION, end_ids={tok.eos_token_id})
    assert e.unlocated == 1
    assert "positive" not in tok.decode([t for t, m in zip(e.input_ids, e.mask) if m])


def test_truncation(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask, _ = assistant_mask(tok, CONVERSATION, 5)
    assert len(ids) == len(mask) == 5
