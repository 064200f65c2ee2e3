"""The fused LoRA forward (ftpipe/training/cpu_fastpath.py) equals peft's own, outputs and gradients."""

from __future__ import annotations

import pytest
import torch


def _lora_model(model_dir, dropout: float, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero in peft: give it values so the LoRA path counts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _run(model, ids, seed: int):
    torch.manual_seed(seed)  # same dropout masks in both runs
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.item(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_forward_matches_peft(tiny_model_dir, dropout, monkeypatch):
    from peft.tuners.lora import layer as lora_layer

    from ftpipe.training.cpu_fastpath import fuse_lora_linear

    monkeypatch.setattr(lora_layer.Linear, "forward", lora_layer.Linear.forward)  # undone after the test
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = _lora_model(tiny_model_dir, dropout).train()
    want = _run(reference, ids, seed=5)

    calls = {"fused": 0}
    assert fuse_lora_linear()
    fused_forward = lora_layer.Linear.forward
    assert getattr(fused_forward, "_ftpipe_fused", False)

    def counting(self, x, *args, **kwargs):
        calls["fused"] += 1
        return fused_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "forward", counting)
    fused = _lora_model(tiny_model_dir, dropout).train()
    got = _run(fused, ids, seed=5)
    assert calls["fused"] > 0
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    assert got[2].keys() == want[2].keys() and len(got[2]) > 0
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_falls_back_for_disabled_adapters(tiny_model_dir, monkeypatch):
    from peft.tuners.lora import layer as lora_layer

    from ftpipe.training.cpu_fastpath import fuse_lora_linear

    monkeypatch.setattr(lora_layer.Linear, "forward", lora_layer.Linear.forward)
    model = _lora_model(tiny_model_dir, 0.0).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    fuse_lora_linear()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base)  # peft's own path: adapters off
        assert not torch.allclose(model(input_ids=ids).logits, base)  # fused path: the adapter counts


def test_return_freed_memory_to_os_on_glibc():
    import platform

    from ftpipe.training.cpu_fastpath import return_freed_memory_to_os

    assert return_freed_memory_to_os() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("assistant_only", [True, False])
def test_plain_loss_equals_trl_fused_loss(tiny_model_dir, tmp_path, assistant_only):
    """The full-logits loss of small CPU micro-batches equals TRL's fused-LM-head loss, metrics included."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from conftest import REPO
    from ftpipe.training.cpu_fastpath import plain_loss_trainer
    from ftpipe.handoff.prepared import read_training_rows

    rows = read_training_rows(REPO / "data/demo/sentiment.jsonl")[:16]
    results = []
    for cls in (SFTTrainer, plain_loss_trainer(SFTTrainer)):
        torch.manual_seed(0)
        args = SFTConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, max_length=128, packing=True,
                         per_device_train_batch_size=2, assistant_only_loss=assistant_only, report_to="none",
                         disable_tqdm=True, seed=0)
        trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                      peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.item(), grads, metrics))
    (want, want_grads, want_metrics), (got, got_grads, got_metrics) = results
    assert got == pytest.approx(want, rel=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    assert got_metrics.keys() == want_metrics.keys() >= {"entropy", "mean_token_accuracy", "num_tokens"}
    for key in want_metrics:
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-4), key


def _packed_model(model_dir, attention: str):
    from transformers import AutoModelForCausalLM

    from ftpipe.training.cpu_fastpath import use_document_attention

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if attention == "document":
        assert use_document_attention(model)
    return model.train()


def _forward_backward(model, use_cache=False, **inputs):  # training runs without a KV cache
    model.zero_grad()
    out = model(use_cache=use_cache, **inputs)
    (out.logits.float().square().mean()).backward()  # every position's output matters
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_document_attention_equals_sdpa_on_a_packed_row(model_fixture, request, monkeypatch):
    from transformers.integrations import sdpa_attention

    from ftpipe.training import cpu_fastpath

    model_dir = request.getfixturevalue(model_fixture)
    sizes = [10, 15, 1, 12, 4]  # documents packed in one row, as TRL's padding-free collator does
    ids = torch.randint(0, 1000, (1, sum(sizes)), generator=torch.Generator().manual_seed(3))
    positions = torch.cat([torch.arange(n) for n in sizes]).unsqueeze(0)
    want = _forward_backward(_packed_model(model_dir, "sdpa"), input_ids=ids, position_ids=positions)
    fallbacks = []
    original = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: fallbacks.append(1) or original(*a, **k))
    model = _packed_model(model_dir, "document")
    got = _forward_backward(model, input_ids=ids, position_ids=positions)
    assert model.config._attn_implementation == cpu_fastpath.DOCUMENT_ATTENTION and not fallbacks
    _assert_same(got, want)
    # Documents really are separate: changing the first document leaves the others' logits alone.
    ids2 = ids.clone()
    ids2[0, :sizes[0]] = (ids2[0, :sizes[0]] + 1) % 1000
    other = _forward_backward(model, input_ids=ids2, position_ids=positions)[0]
    torch.testing.assert_close(other[0, sizes[0]:], got[0][0, sizes[0]:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[0, :sizes[0]], got[0][0, :sizes[0]])


def test_document_attention_falls_back_to_sdpa_with_its_mask(tiny_model_dir, monkeypatch):
    from ftpipe.training import cpu_fastpath

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded batch of two rows: not a packed row
    want = _forward_backward(_packed_model(tiny_model_dir, "sdpa"), input_ids=ids, attention_mask=mask)
    got = _forward_backward(_packed_model(tiny_model_dir, "document"), input_ids=ids, attention_mask=mask)
    _assert_same(got, want)
    monkeypatch.setattr(cpu_fastpath, "MAX_DOCUMENTS", 3)  # too many documents in the row: one masked call
    positions = torch.tensor([[0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 0, 1]])
    want = _forward_backward(_packed_model(tiny_model_dir, "sdpa"), input_ids=ids[:1], position_ids=positions)
    got = _forward_backward(_packed_model(tiny_model_dir, "document"), input_ids=ids[:1], position_ids=positions)
    _assert_same(got, want)
    # With a KV cache transformers treats the row as one sequence (no packed mask): so does this.
    want = _forward_backward(_packed_model(tiny_model_dir, "sdpa"), use_cache=True, input_ids=ids[:1], position_ids=positions)
    got = _forward_backward(_packed_model(tiny_model_dir, "document"), use_cache=True, input_ids=ids[:1], position_ids=positions)
    _assert_same(got, want)


def test_document_attention_is_only_used_where_it_is_exact(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ftpipe.training.cpu_fastpath import use_document_attention

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    assert not use_document_attention(eager) and eager.config._attn_implementation == "eager"
    windowed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    windowed.config.model_type = "mistral"  # sliding-window families keep transformers' masks
    assert not use_document_attention(windowed) and windowed.config._attn_implementation == "sdpa"
