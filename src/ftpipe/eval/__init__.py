"""Evaluation stages: perplexity and prompt checks (`eval-sft`), the HTML report (`report`)."""
