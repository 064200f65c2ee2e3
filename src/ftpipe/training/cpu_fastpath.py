"""Two CPU-only speed/memory measures for the training process of `finetune-sft`.

- `return_freed_memory_to_os`: glibc serves allocations of >= 1 MiB with mmap, so the activations
  freed after each backward go back to the OS at once. By default glibc raises that threshold as
  big blocks are freed, and the heap then fragments: measured on the 135M Llama shape (fp32, 4 x 256
  tokens), peak RSS 4.0 GB and growing from step to step, against 3.2 GB flat with the threshold.
- `fuse_lora_linear`: peft's LoRA `Linear.forward` computes `base(x) + B(A(dropout(x))) * scaling` as
  four passes over the output; when base, LoRA weights and input share one dtype (fp32 training on
  the CPU) the same value is `addmm(base(x), A(dropout(x)), B^T, alpha=scaling)`: one fused pass,
  one output tensor fewer kept for backward. Every other case (merged or disabled adapters, several
  adapters, DoRA and other variants, mixed dtypes, extra arguments) runs peft's own forward.
  tests/training/test_cpu_fastpath.py checks outputs and gradients against peft's forward.

Both are applied by `ftpipe.training.sft.train` when the plan's device is the CPU, in the training
process only (exports and evaluation use peft unchanged).

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory_to_os() -> bool:
    """Set glibc's mmap threshold (see the module docstring); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False


def fuse_lora_linear() -> bool:
    """Patch peft's LoRA `Linear.forward` with the fused same-dtype path (idempotent)."""
    import torch
    import torch.nn.functional as F
    from peft.tuners.lora import layer as lora_layer

    linear_cls = lora_layer.Linear
    if getattr(linear_cls.forward, "_ftpipe_fused", False):
        return True
    original = linear_cls.forward

    def forward(self, x, *args, **kwargs):
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return original(self, x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.base_layer
        if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
                or type(base) is not torch.nn.Linear):
            return original(self, x, *args, **kwargs)
        a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
        if not (x.dtype == a_weight.dtype == b_weight.dtype == base.weight.dtype):
            return original(self, x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, base.weight, base.bias)
        down = F.linear(self.lora_dropout[name](flat), a_weight)
        out = torch.addmm(out, down, b_weight.t(), alpha=self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])

    forward._ftpipe_fused = True  # type: ignore[attr-defined]
    linear_cls.forward = forward
    return True


PLAIN_LOSS_MAX_LOGITS_BYTES = 256 * 2**20  # full fp32 logits of one micro-batch at most this big


def plain_loss_fits(micro_batch_tokens: int, vocab_size: int) -> bool:
    """True when one micro-batch's full fp32 logits are small enough for `plain_loss_trainer`."""
    return micro_batch_tokens * vocab_size * 4 <= PLAIN_LOSS_MAX_LOGITS_BYTES


def plain_loss_trainer(base_cls):
    """`base_cls` (TRL's SFTTrainer) with a loss from the full logits for small CPU micro-batches.

    TRL 1.16 computes the loss through its fused, chunked LM head, which never builds the
    (tokens x vocab) logits: the right call for big GPU batches, but its CPU fallback recomputes the
    logits in backward and measured 37% of a training step on the 135M Llama shape (3.1 of 8.4 s
    per 1 x 256-token pass, torch profiler). With micro-batches of a few hundred tokens the full
    logits are small (256 x 49152 x 4 B = 50 MB): one log-softmax over the labelled positions only,
    a gather, and the same metrics TRL logs (entropy, mean token accuracy, tokens) from it. The loss is TRL's: the negative
    log-likelihood summed over labelled next tokens, divided by `num_items_in_batch` (or the
    labelled tokens of this pass). Anything else (aux losses, label smoothing, a custom loss,
    pre-shifted labels) goes to TRL's own `compute_loss`.
    """
    import torch

    class PlainLossSFTTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (return_outputs or "labels" not in inputs or "shift_labels" in inputs or self.compute_loss_func is not None
                    or self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            inputs["use_cache"] = False
            labels = inputs["labels"]
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            target = labels[:, 1:]
            mask = target != -100
            # Only labelled positions get a softmax (with assistant-only loss, a fraction of them).
            logp = torch.log_softmax(outputs.logits[:, :-1][mask].float(), dim=-1)  # (labelled, vocab)
            target = target[mask]
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -logp.gather(-1, target.unsqueeze(-1)).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients
            with torch.no_grad():  # the metrics TRL logs
                entropy = -(logp.exp() * logp).sum(-1)
                correct = logp.argmax(-1) == target
                gather = self.accelerator.gather_for_metrics
                valid = gather(mask.sum()).sum()
                self._metrics[mode]["entropy"].append((gather(entropy.sum()).sum() / valid).item() if valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append(
                    (gather(correct.sum()).sum() / valid).item() if valid > 0 else 0.0
                )
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = gather(inputs["attention_mask"].sum()).sum().item()
                else:
                    tokens = gather(torch.tensor(inputs["input_ids"].size(1))).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return PlainLossSFTTrainer
