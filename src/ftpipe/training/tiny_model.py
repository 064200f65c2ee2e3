"""Build a tiny local model with no downloads (`ftpipe make-tiny-model`).

A byte-level BPE tokenizer is trained with `tokenizers` on English text that ships with Python
(`pydoc_data.topics`) plus any extra text given; the chat template is ChatML with
`{% generation %}` tags (so TRL's assistant-only loss works); the model is a random-init Llama or
Qwen2 config whose sizes are multiples of 128 (AWQ group size). Saved as safetensors.

    ftpipe make-tiny-model --out models/tiny
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ftpipe.core.errors import InputError
from ftpipe.core.config import TinyModelConfig
from ftpipe.handoff.base_model import TINY_SPEC_FILE

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML; assistant turns wrapped in generation tags for assistant-only loss masks.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- (message['content'] or '') + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(extra_files: list[Path]) -> list[str]:
    from pydoc_data.topics import topics

    texts = [t for t in topics.values() if t.strip()]
    for path in extra_files:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read tokenizer text ({exc.__class__.__name__})") from None
    return texts


def build_tokenizer(cfg: TinyModelConfig, extra_files: list[Path] = ()):
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(list(extra_files)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
        model_max_length=cfg.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path, cfg: TinyModelConfig, extra_files: list[Path] = (), root: Path | None = None) -> dict:
    info = _build(out, cfg, extra_files, root)
    (Path(out) / TINY_SPEC_FILE).write_text(json.dumps(cfg.model_dump(), sort_keys=True), encoding="utf-8")
    return info


def _build(out: Path, cfg: TinyModelConfig, extra_files: list[Path] = (), root: Path | None = None) -> dict:
    """Build and save the tiny model + tokenizer into `out`.

    With `cfg.family`, the family's architecture, real tokenizer, chat template and special
    tokens (ftpipe/training/families.py; `root` holds the material cache), else a ChatML Llama /
    Qwen2 with a locally trained tokenizer.

    Returns:
        A summary: parameter count, vocab size, architecture.

    Raises:
        InputError: sizes that AWQ cannot quantize (not multiples of 128) or heads not dividing.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    problems = [
        f"model.tiny.{name} = {value} is not a multiple of 128 (AWQ group size)"
        for name, value in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size))
        if value % 128
    ]
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        problems.append("model.tiny.num_heads must divide hidden_size and be a multiple of num_kv_heads")
    if problems:
        raise InputError("; ".join(problems))

    if cfg.family:
        return _build_family(out, cfg, root)
    tokenizer = build_tokenizer(cfg, extra_files)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|pad|>")
    config_cls = LlamaConfig if cfg.arch == "llama" else Qwen2Config
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=endoftext_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, endoftext_id], pad_token_id=pad_id, bos_token_id=endoftext_id
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny %s model: %d parameters, vocab %d -> %s", cfg.arch, n_params, len(tokenizer), out)
    return {"arch": cfg.arch, "parameters": n_params, "vocab_size": len(tokenizer), "tied": cfg.tie_word_embeddings}


def _build_family(out: Path, cfg: TinyModelConfig, root: Path | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ftpipe.handoff.chat_template import adds_bos
    from ftpipe.training import families

    fam = families.family(cfg.family)
    root = Path(root) if root is not None else Path.cwd()
    tokenizer = families.build_tokenizer(fam, root, cfg.max_position_embeddings)
    sizes = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    config = families.model_config(fam, tokenizer, sizes)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stops = families.end_of_turn_ids(fam, tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=config.pad_token_id, bos_token_id=getattr(config, "bos_token_id", None)
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # As the released tokenizer_config.json says (transformers does not write them; llama.cpp's
    # converter reads them there).
    config_file = out / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    settings.update(add_bos_token=adds_bos(tokenizer), add_eos_token=False)
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    families.write_sentencepiece_model(fam, root, out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny %s model (%s, %s): %d parameters, vocab %d -> %s",
             fam.name, type(model).__name__, fam.released_as, n_params, len(tokenizer), out)
    return {"arch": type(model).__name__, "family": fam.name, "parameters": n_params,
            "vocab_size": len(tokenizer), "tied": fam.tied}
