"""Hand-offs: what one stage passes to the next, each defined once.

Stages never import each other's packages (data/, training/, export/, eval/, serve/); what they
share goes through one module here per thing:

- `prepared`: the prepared split (prepared/<dataset>/*.jsonl) and the prompt of a conversation;
- `checks`: the prompt-checks file (`eval.prompts_file`) and how one answer is judged;
- `base_model`: the adapter's `ftpipe_base_model.json` (written by finetune-sft, read downstream);
- `measure`: perplexity over assistant tokens and greedy decoding (convert-awq, eval-sft).

Nothing heavy is imported at module level.

    ftpipe run --config debug_config.yaml
"""
