"""Training stages: LoRA SFT (`finetune-sft`) and the tiny local model (`make-tiny-model`)."""
