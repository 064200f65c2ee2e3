"""Hand-offs: what one stage passes to the next, each defined once.

Stages never import each other's packages (data/, training/, export/, eval/, serve/); what they
share goes through one module here per thing:

- `prepared`: the prepared split (prepared/<dataset>/*.jsonl) and the prompt of a conversation;
- `checks`: the prompt-checks file (`eval.prompts_file`) and how one answer is judged;
- `base_model`: the adapter's `ftpipe_base_model.json` (written by finetune-sft, read downstream);
- `measure`: the assistant mask, perplexity over its tokens and greedy decoding (finetune-sft,
  convert-awq, eval-sft);
- `chat_template`: what a chat template / tokenizer supports (tools, BOS, end-of-turn ids).
- `chosen_template`: `model.chat_template`, the template that replaces the model's own (a base model's).
- `spm`: a GGUF's SentencePiece vocabulary as tokenizer.model, and its '▁' per text segment
  (make-tiny-model's families, import-gguf).

Nothing heavy is imported at module level.

    ftpipe run --config debug_config.yaml
"""
