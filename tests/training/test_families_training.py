"""finetune-sft on every model family: the labels are exactly the assistant mask of
ftpipe.handoff.measure (content + end-of-turn token, pad == eos included), ftpipe's ChatML model
keeps TRL's labels, training and eval render the same prompt. Each family trained end to end
(through the CPU labelled-loss path) is the finetune-sft cell of tests/e2e/test_family_matrix.py."""

from __future__ import annotations


import pytest

from tests.conftest import FAMILY_NAMES

CONVERSATIONS = [
    [{"role": "user", "content": "Great kettle."}, {"role": "assistant", "content": "positive"}],
    [{"role": "system", "content": "Label it."}, {"role": "user", "content": "Great kettle."},
     {"role": "assistant", "content": "positive"}, {"role": "user", "content": "Awful sofa, sadly."},
     {"role": "assistant", "content": "negative"}],
]
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>", "phi3.5": "<|end|>",
               "mistral": "</s>", "gemma": "<turn|>"}
EXPECTED = {  # the labelled spans of each conversation above (Qwen3: the last turn as generated)
    0: ["positive{eot}"],
    1: ["positive{eot}", "negative{eot}"],
}


def _trainer(model_dir, out, rows, *, packing=False, pad_is_eos=False, batch_size=2):
    """TRL's SFTTrainer fed as finetune-sft feeds it (sft.tokenize_rows, sft_config's assistant_only_loss=False)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftpipe.handoff.measure import end_of_turn_ids
    from ftpipe.training.sft import tokenize_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    if pad_is_eos:  # as many released models ship (Phi-3.5: pad == eos)
        tok.pad_token = _end_of_turn_token(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data, counts = tokenize_rows(tok, rows, end_of_turn_ids(tok, model.generation_config), True)
    args = SFTConfig(output_dir=str(out), use_cpu=True, max_length=256, packing=packing,
                     per_device_train_batch_size=batch_size, assistant_only_loss=False, report_to="none",
                     disable_tqdm=True, seed=0, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    return trainer, tok, counts


def _end_of_turn_token(tok) -> str:
    """The token the chat template ends an assistant turn with."""
    from ftpipe.handoff.measure import template_end_of_turn

    return tok.convert_ids_to_tokens(template_end_of_turn(tok))


def _labelled_spans(tok, labels) -> list[str]:
    spans, run = [], []
    for t in [*labels.tolist(), -100]:
        if t != -100:
            run.append(t)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["own-pad", "pad==eos"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_are_content_and_end_of_turn(family_model, family, pad_is_eos, tmp_path):
    """The batch TRL trains on: each assistant turn and its end-of-turn token, also when pad == eos
    (the unsloth#416 trap: masking pad ids would mask every EOS out)."""
    trainer, tok, counts = _trainer(family_model(family), tmp_path, [{"messages": c} for c in CONVERSATIONS],
                                    pad_is_eos=pad_is_eos)
    assert counts["assistant_turns"] == 3 and counts["assistant_turns_unlocated"] == 0
    eot = END_OF_TURN[family]
    if pad_is_eos:
        assert tok.pad_token == eot
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # padded rows: the shorter one carries pad ids
    if pad_is_eos:
        assert (batch["input_ids"][0] == tok.pad_token_id).sum() > 1  # pads and the real end-of-turn tokens
    eot_id = tok.convert_tokens_to_ids(eot)
    for row, labels in enumerate(batch["labels"]):
        want = [s.format(eot=eot) for s in EXPECTED[row]]
        if family == "qwen3":
            want[-1] = "<think>\n\n</think>\n\n" + want[-1]
        assert _labelled_spans(tok, labels) == want
        assert int((labels == eot_id).sum()) == len(want)  # every end-of-turn learned, no padding labelled


def test_chatml_model_with_generation_tags_keeps_trls_labels(tiny_model_dir, tmp_path):
    """ftpipe's tiny ChatML model (with {% generation %} tags): the labels TRL built itself from the
    messages with assistant_only_loss=True are the labels finetune-sft now hands it."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ftpipe.handoff.prepared import read_training_rows
    from tests.conftest import REPO

    rows = read_training_rows(REPO / "data/demo/sentiment.jsonl")[:24]
    rows.append({"messages": CONVERSATIONS[1]})
    ours, tok, _ = _trainer(tiny_model_dir, tmp_path / "ours", rows)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_length=256, packing=False,
                     assistant_only_loss=True, report_to="none", disable_tqdm=True, seed=0, shuffle_dataset=False)
    trl = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), args=args,
                     train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert ours.train_dataset["input_ids"] == trl.train_dataset["input_ids"]
    assert ours.train_dataset["labels"] == trl.train_dataset["labels"]
    assert any(label != -100 for labels in ours.train_dataset["labels"] for label in labels)


def test_training_and_eval_render_the_same_default_system_prompt(family_model):
    """Qwen2.5 inserts its default system prompt when a conversation has none: the training rendering
    and eval's prompt (prepared.prompt + the generation prompt) both carry it, token for token."""
    from transformers import AutoTokenizer

    from ftpipe.handoff.measure import encode_conversation
    from ftpipe.handoff.prepared import prompt

    tok = AutoTokenizer.from_pretrained(family_model("qwen2.5"))
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    conversation = CONVERSATIONS[0]
    trained = encode_conversation(tok, conversation)
    asked = tok.apply_chat_template(prompt(conversation), add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
    assert default in tok.decode(trained.input_ids) and default in tok.decode(asked)
    # The eval prompt is exactly the training tokens before the target.
    first = trained.mask.index(1)
    assert list(asked) == trained.input_ids[:first]
