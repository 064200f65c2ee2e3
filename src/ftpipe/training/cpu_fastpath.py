"""CPU-only speed/memory measures for the training process of `finetune-sft`.

- `return_freed_memory_to_os`: glibc serves allocations of >= 4 MiB with mmap, so big buffers
  (logits, a big batch's activations) freed after each backward go back to the OS at once. By
  default glibc raises that threshold as big blocks are freed, and the heap then fragments:
  measured on the 135M Llama shape (fp32, 4 x 256 tokens), peak RSS 4.0 GB and growing from step
  to step, against 3.2 GB flat with a fixed threshold. 4 MiB rather than 1 MiB: the activations of
  a 256-token pass (~1.5 MB each) then come from the heap instead of fresh, page-faulting mmaps
  (an elementwise op on one: 0.17 against 0.5-0.6 ms): +5% tokens/s at the same peak RSS (12
  steps, bench shape: 174.7 vs 165.8 tokens/s, 1664 vs 1659 MB).
- `fuse_lora_linear`: peft's LoRA `Linear.forward` computes `base(x) + B(A(dropout(x))) * scaling` as
  four passes over the output; when base, LoRA weights and input share one dtype (fp32 training on
  the CPU) the same value is `base(x).addmm_(A(dropout(x)), B^T, alpha=scaling)`: one fused pass
  in place, one output tensor fewer kept for backward. Every other case (merged or disabled
  adapters, several adapters, DoRA and other variants, mixed dtypes, extra arguments) runs peft's
  own forward. tests/training/test_cpu_fastpath.py checks outputs and gradients against peft's.
- `plain_loss_trainer`: the loss from the full logits of the labelled positions for small passes.
- `use_document_attention`: with packing, one causal SDPA call per packed document instead of one
  masked call over the whole row.

All are applied by `ftpipe.training.sft.train` when the plan's device is the CPU, in the training
process only (exports and evaluation use peft and transformers unchanged).

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20


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
        # In place: `out` is F.linear's result, which its backward does not need (an out-of-place
        # addmm would first copy it into a new tensor).
        out.addmm_(down, b_weight.t(), alpha=self.scaling[name])
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
            # Position t predicts token t+1: select the positions whose next token is labelled in
            # one indexing op (a slice and then a mask would each build a logits-sized gradient).
            mask = torch.zeros_like(labels, dtype=torch.bool)
            mask[:, :-1] = labels[:, 1:] != -100
            target = labels[:, 1:][mask[:, :-1]]
            # Only labelled positions get a softmax (with assistant-only loss, a fraction of them).
            logp = torch.log_softmax(outputs.logits[mask].float(), dim=-1)  # (labelled, vocab)
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


DOCUMENT_ATTENTION = "ftpipe_document_sdpa"
DOCUMENT_ATTENTION_MODELS = ("llama", "qwen2", "qwen3")  # full causal attention, no sliding window by default
MAX_DOCUMENTS = 64  # more (tiny) documents in one packed row: one masked SDPA call is cheaper than the loop
_rows: list = [None, None]  # (the mask transformers built, its document sizes or None): every layer sees the same


def document_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention of a packed row, one document at a time.

    TRL packs several short documents into one row (padding-free, `position_ids` restarting at 0
    for each), and transformers' SDPA then attends over the whole row through a block-diagonal
    causal mask: it computes every token pair of the row and masks most of them away. When the mask
    transformers built for this row is exactly that (checked once per forward against the
    documents read from `position_ids`), each document gets its own causal SDPA call instead: the
    same result (tests/training/test_cpu_fastpath.py), a fraction of the work for short documents
    (measured per layer on 5 documents of ~48 tokens: 1.9 ms against 5.2 ms, forward and backward).
    Every other case (no mask, padding, a KV cache, several rows, dropout, a sliding window, more
    than `MAX_DOCUMENTS` documents) is transformers' SDPA with its mask, unchanged.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    sizes = None
    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None and position_ids is not None and query.shape[0] == 1
            and not (dropout and module.training) and getattr(module, "sliding_window", None) is None
            and kwargs.get("s_aux") is None):
        if _rows[0] is not attention_mask:
            _rows[:] = [attention_mask, _documents(attention_mask, position_ids, query.shape[2], key.shape[2])]
        sizes = _rows[1]
    if sizes is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    # split (not slicing): its backward concatenates the gradients instead of zero-filling a
    # full-size tensor per document.
    out = torch.cat([
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2))
    ], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _documents(mask, position_ids, q_length: int, kv_length: int) -> list[int] | None:
    """Document sizes when `mask` is exactly the block-diagonal causal mask of the documents in
    `position_ids` (a new one wherever the position does not follow the previous), else None."""
    import torch

    if (mask.dtype != torch.bool or tuple(mask.shape) != (1, 1, q_length, kv_length) or q_length != kv_length
            or position_ids.shape != (1, q_length)):
        return None
    starts = (torch.diff(position_ids[0]) != 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *starts, q_length]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(sizes) > MAX_DOCUMENTS:
        return None
    document = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    expected = (document[:, None] == document[None, :]) & torch.ones(q_length, q_length, dtype=torch.bool).tril()
    return sizes if torch.equal(mask[0, 0].cpu(), expected) else None


def use_document_attention(model) -> bool:
    """Switch a Llama/Qwen2/Qwen3 model from SDPA to `document_attention` (False: left as it is)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = model.config.get_text_config()
    if (config.model_type not in DOCUMENT_ATTENTION_MODELS or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "use_sliding_window", False)):
        return False
    AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DOCUMENT_ATTENTION, sdpa_mask)  # the fallback gets SDPA's mask
    model.set_attn_implementation(DOCUMENT_ATTENTION)
    return True
