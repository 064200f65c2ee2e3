"""CPU-only speed/memory measures for the training processes of `finetune-sft` and `finetune-dpo`.

- `return_freed_memory_to_os`: glibc serves allocations of >= `MMAP_THRESHOLD_BYTES` with mmap, so
  big buffers (logits, a big batch's activations) freed after each backward go back to the OS at
  once. By default glibc raises that threshold as big blocks are freed, and the heap then
  fragments: peak memory grows from step to step. 4 MiB rather than 1 MiB: the activations of a
  short-sequence pass then come from the heap instead of fresh, page-faulting mmaps, which is
  faster at the same peak.
- `fuse_lora_linear`: peft's LoRA `Linear.forward` computes `base(x) + B(A(dropout(x))) * scaling` as
  four passes over the output; when base, LoRA weights and input share one dtype (fp32 training on
  the CPU) the same value is `base(x).addmm_(A(dropout(x)), B^T, alpha=scaling)`: one fused pass
  in place, one output tensor fewer kept for backward. Every other case (merged or disabled
  adapters, several adapters, DoRA and other variants, mixed dtypes, extra arguments) runs peft's
  own forward. tests/training/test_cpu_fastpath.py checks outputs and gradients against peft's.
- `labelled_loss_trainer`: the LM head and the loss only at the labelled positions, in chunks of
  `LABELLED_HEAD_CHUNK_BYTES` of logits, with the gradient computed as each chunk is scored.
- `use_document_attention`: with packing, one causal SDPA call per packed document instead of one
  masked call over the whole row.

The training harness (`ftpipe.training.harness`) sets the memory threshold and, for LoRA, the
fused forward in every CPU training process (SFT and DPO); `ftpipe.training.sft` adds the labelled
head and document attention to SFT. Training processes only: exports and evaluation use peft and
transformers unchanged. What each one measured: docs/finetune.md ("CPU fast path: measurements").

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


# fp32 logits of one chunk of labelled positions at most this big (two such buffers are alive while a
# chunk is scored). Smaller chunks cost speed when most positions are labelled, bigger ones memory
# for little gain (docs/finetune.md).
LABELLED_HEAD_CHUNK_BYTES = 64 * 2**20
# Families whose causal-LM forward is `lm_head(last_hidden_state)`, then at most
# `final_logit_softcapping` (Gemma 2/3/4), checked against transformers' modeling files (the
# model's own config: a multimodal wrapper's text config does not count); any other family keeps
# TRL's own loss. Every family of `make-tiny-model --family` is here (llama, qwen2, qwen3, phi3,
# mistral, gemma4_text).
LABELLED_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma4_text",
                        "smollm3", "phi3", "olmo2")


def labelled_chunk_size(vocab_size: int) -> int:
    """Labelled positions per LM-head chunk: `LABELLED_HEAD_CHUNK_BYTES` of fp32 logits."""
    return max(1, LABELLED_HEAD_CHUNK_BYTES // (4 * vocab_size))


@functools.cache
def _labelled_nll():
    import torch

    class LabelledNLL(torch.autograd.Function):
        """Summed negative log-likelihood of `targets` under `softcap(hidden @ weight.T + bias)`, in chunks.

        Each chunk's logits live only inside `forward`: the chunk's share of the gradient (softmax minus
        one-hot, through the softcap) is computed there and then and kept as the small gradients of
        `hidden`, `weight` and `bias`, which `backward` scales by the incoming gradient. Two matmuls per
        chunk (logits, gradient), against three for a head that recomputes its logits in backward, and
        at most one chunk's logits (two buffers of `chunk` x vocab fp32) alive at a time. Also returns,
        without gradient, the summed entropy of the chunks' distributions and the count of targets that
        are the first argmax (TRL's `entropy` and `mean_token_accuracy`).
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, softcap, chunk, with_grad):
            ctx.set_materialize_grads(False)
            device = hidden.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
            need_hidden, need_weight, need_bias = (with_grad and n for n in ctx.needs_input_grad[:3])
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
            entropy = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)
                t = targets[start:start + chunk].unsqueeze(-1)
                z = (torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())).float()
                if softcap is not None:
                    z.div_(softcap).tanh_().mul_(softcap)
                top, best = z.max(-1, keepdim=True)  # max: the first maximum's index, as TRL's `is_top1`
                correct += (best == t).sum()
                nll += (top - z.gather(-1, t)).sum()
                z.sub_(top)  # log p = z - log(sum exp z), with the row max taken out first
                e = torch.exp(z)
                sum_e = e.sum(-1, keepdim=True)
                log_sum = sum_e.log()
                nll += log_sum.sum()
                # entropy = log(sum e) - sum(e * z) / sum(e), the dot product row by row without a temporary
                entropy += (log_sum - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1, 1) / sum_e).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad = e.div_(sum_e)  # d nll / d z = softmax - one-hot
                grad.scatter_add_(-1, t, torch.full_like(t, -1, dtype=grad.dtype))
                if softcap is not None:  # d(c tanh(y / c)) / dy = 1 - tanh^2, from the capped logits
                    grad.mul_(z.add_(top).div_(softcap).square_().neg_().add_(1))
                grad = grad.to(dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk] = torch.mm(grad, w)
                if need_weight:
                    grad_weight.add_(torch.mm(grad.t(), h))
                if need_bias:
                    grad_bias.add_(grad.sum(0, dtype=torch.float32))
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            ctx.mark_non_differentiable(entropy, correct)
            return nll, entropy, correct

        @staticmethod
        def backward(ctx, grad_nll, *_):
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            if grad_nll is None:
                return None, None, None, None, None, None, None
            scale = lambda g, dtype=None: None if g is None else (g * grad_nll).to(dtype or g.dtype)  # noqa: E731
            return (scale(grad_hidden), scale(grad_weight, ctx.dtypes[0]), scale(grad_bias, ctx.dtypes[1]),
                    None, None, None, None)

    return LabelledNLL


def add_labelled_head(model) -> bool:
    """Give `model` (a causal LM, before or after TRL's patch) a `labelled_head=True` forward mode.

    In that mode the forward runs the decoder body, keeps the hidden states of the positions whose
    next token is labelled (labels != -100 after the shift), and runs the LM head and cross-entropy
    on those only, `labelled_chunk_size` positions at a time (`LabelledNLL`). It returns a
    `LabelledLMOutput`, not logits. Without the keyword the forward is the one it had.

    Returns:
        False (model left as it is) for families outside `LABELLED_HEAD_MODELS` or an LM head that
        is not a plain `nn.Linear` (e.g. one wrapped by an adapter).
    """
    import types

    import torch

    config = model.config
    head = model.get_output_embeddings()
    if config.model_type not in LABELLED_HEAD_MODELS or type(head) is not torch.nn.Linear:
        return False
    if getattr(model.forward, "_ftpipe_labelled", False):
        return True
    original = model.forward
    softcap = getattr(config, "final_logit_softcapping", None)
    chunk = labelled_chunk_size(head.weight.shape[0])

    def forward(self, *args, labelled_head: bool = False, labels=None, **kwargs):
        if not labelled_head:
            return original(*args, **({} if labels is None else {"labels": labels}), **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        # Position t predicts token t+1: one index of the unshifted hidden states (a slice and then a
        # mask would each build a hidden-sized gradient).
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        head = self.get_output_embeddings()
        nll, entropy, correct = _labelled_nll().apply(
            hidden[mask], head.weight, head.bias, labels[:, 1:][mask[:, :-1]], softcap, chunk, torch.is_grad_enabled()
        )
        return _labelled_output()(nll_sum=nll, entropy_sum=entropy, correct=correct, label_count=mask.sum())

    forward._ftpipe_labelled = True  # type: ignore[attr-defined]
    model.forward = types.MethodType(forward, model)
    return True


@functools.cache
def _labelled_output():
    from dataclasses import dataclass

    import torch
    from transformers.utils import ModelOutput

    @dataclass
    class LabelledLMOutput(ModelOutput):
        """What the `labelled_head=True` forward returns (a ModelOutput: accelerate walks its tensors)."""

        nll_sum: torch.Tensor | None = None  # summed negative log-likelihood of the labelled next tokens
        entropy_sum: torch.Tensor | None = None  # summed entropy of their predicted distributions (no gradient)
        correct: torch.Tensor | None = None  # labelled next tokens that are the argmax
        label_count: torch.Tensor | None = None  # labelled next tokens

    return LabelledLMOutput


def labelled_loss_trainer(base_cls):
    """`base_cls` (TRL's SFTTrainer) with the loss from the LM head at the labelled positions only.

    TRL computes the loss through its fused, chunked LM head, which never builds the
    (tokens x vocab) logits; on a device without Triton it scores every position, labelled or not,
    and recomputes each tile's logits in backward: a large share of a small model's training step,
    growing with the vocabulary (docs/finetune.md). With assistant-only loss only a fraction of
    the positions are labelled: `add_labelled_head` scores those only, in chunks of
    `LABELLED_HEAD_CHUNK_BYTES` of logits, with
    two matmuls per chunk. The loss is TRL's: the negative log-likelihood summed over labelled next
    tokens, divided by `num_items_in_batch` (or the labelled tokens of this pass); the metrics are
    TRL's (entropy, mean token accuracy, tokens). Anything else (aux losses, label smoothing, a
    custom loss, pre-shifted labels, other families) goes to TRL's own `compute_loss`.
    tests/training/test_cpu_fastpath.py checks loss, gradients and metrics against it.
    """
    import torch

    class LabelledLossSFTTrainer(base_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self.labelled_head = add_labelled_head(inner)
            if self.labelled_head:
                log.info("loss: LM head at the labelled positions only, %d per chunk (cpu_fastpath)",
                         labelled_chunk_size(inner.get_output_embeddings().weight.shape[0]))
            else:
                log.info("loss: TRL's fused LM head (%s: not a family with a plain LM head)", inner.config.model_type)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (not self.labelled_head or return_outputs or "labels" not in inputs or "shift_labels" in inputs
                    or self.compute_loss_func is not None or self.label_smoother is not None
                    or self.args.loss_type != "nll" or self.aux_loss_enabled):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            out = model(**inputs, labelled_head=True)
            count = out.label_count if num_items_in_batch is None else num_items_in_batch
            loss = out.nll_sum / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients
            gather = self.accelerator.gather_for_metrics
            valid = gather(out.label_count).sum()
            self._metrics[mode]["entropy"].append((gather(out.entropy_sum).sum() / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(
                (gather(out.correct).sum() / valid).item() if valid > 0 else 0.0
            )
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = gather(inputs["attention_mask"].sum()).sum().item()
                else:
                    tokens = gather(torch.tensor(inputs["input_ids"].size(1))).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LabelledLossSFTTrainer


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
    (docs/finetune.md).
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

