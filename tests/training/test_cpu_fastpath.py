"""The CPU fast path (ftpipe/training/cpu_fastpath.py) equals the libraries' own: fused LoRA forward, labelled LM
head and loss, document attention (outputs, gradients, logged metrics)."""

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


def _full_logits_trainer(base_cls):
    """Reference: the loss and metrics from the full logits (ftpipe's CPU path before the labelled head)."""

    class FullLogitsSFTTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            labels = inputs["labels"]
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
            shifted, target = logits[:, :-1].float(), labels[:, 1:]
            mask = target != -100
            logp = torch.log_softmax(shifted[mask], dim=-1)
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -logp.gather(-1, target[mask].unsqueeze(-1)).sum() / torch.as_tensor(count).clamp(min=1)
            with torch.no_grad():
                valid = mask.sum()
                entropy = -(logp.exp() * logp).sum()
                correct = (logp.argmax(-1) == target[mask]).sum()
                self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
                self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].size(1)
            self._total_train_tokens += int(tokens)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return FullLogitsSFTTrainer


def _trainer_step(cls, model_dir, out, *, packing=True, assistant_only=True, batch_size=2, edit=None,
                  num_items=None):
    """(loss, LoRA gradients, logged metrics, labels) of one compute_loss + backward of `cls` on the demo rows."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from conftest import REPO
    from ftpipe.handoff.prepared import read_training_rows

    torch.manual_seed(0)
    args = SFTConfig(output_dir=str(out), use_cpu=True, max_length=128, packing=packing,
                     per_device_train_batch_size=batch_size, assistant_only_loss=assistant_only, report_to="none",
                     disable_tqdm=True, seed=0)
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                  train_dataset=Dataset.from_list(read_training_rows(REPO / "data/demo/sentiment.jsonl")[:16]),
                  processing_class=AutoTokenizer.from_pretrained(model_dir),
                  peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero in peft: give it values so the LoRA path counts in A's gradients
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    if edit:
        edit(batch)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grads, metrics, batch["labels"]


def _no_labels_in_row_1(batch):
    batch["labels"][1] = -100


def _no_labels(batch):
    batch["labels"][:] = -100


CASES = {  # name: _trainer_step keyword arguments
    "packed, assistant-only": {},
    "packed, every token": {"assistant_only": False},
    "packed, num_items_in_batch": {"num_items": 57},
    "padded rows, one without labels": {"packing": False, "batch_size": 4, "edit": _no_labels_in_row_1},
    "no labelled position": {"packing": False, "edit": _no_labels},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_qwen_dir"])  # Llama tied, Qwen2 untied head
def test_labelled_head_loss_equals_full_logits_and_trl(model_fixture, case, request, tmp_path, monkeypatch):
    """Loss, LoRA gradients and logged metrics of the labelled LM head equal the full-logits loss and TRL's."""
    from trl import SFTTrainer

    from ftpipe.training import cpu_fastpath

    model_dir = request.getfixturevalue(model_fixture)
    # 2 positions per chunk on the 2048-token vocabulary: several chunks.
    monkeypatch.setattr(cpu_fastpath, "LABELLED_HEAD_CHUNK_BYTES", 2 * 4 * 2048)
    calls, nll = [], cpu_fastpath._labelled_nll()
    apply = nll.apply
    monkeypatch.setattr(nll, "apply", lambda hidden, *rest: calls.append(hidden.shape[0]) or apply(hidden, *rest))
    kwargs = CASES[case]
    runs = {name: _trainer_step(cls, model_dir, tmp_path / name, **kwargs) for name, cls in (
        ("trl", SFTTrainer), ("full", _full_logits_trainer(SFTTrainer)),
        ("labelled", cpu_fastpath.labelled_loss_trainer(SFTTrainer)))}
    labels = runs["labelled"][3]
    labelled = int((labels[:, 1:] != -100).sum())
    assert calls == [labelled]  # the labelled path ran, on the labelled positions only
    if case == "no labelled position":
        assert labelled == 0 and runs["labelled"][0] == 0.0
    else:
        assert 2 * 2 < labelled < labels.numel() * (1 if case == "packed, every token" else 0.5)
    if case.startswith("padded"):
        assert (labels[1] == -100).all() and (labels[0] != -100).any()
    got = runs["labelled"]
    for name in ("full", "trl"):
        want = runs[name]
        assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-7), name
        assert got[1].keys() == want[1].keys() and len(got[1]) > 0
        for param in want[1]:
            torch.testing.assert_close(got[1][param], want[1][param], rtol=1e-4, atol=1e-7, msg=f"{name}: {param}")
        assert got[2].keys() == want[2].keys() >= {"entropy", "mean_token_accuracy", "num_tokens"}
        for key in want[2]:
            assert got[2][key] == pytest.approx(want[2][key], rel=1e-5, abs=1e-7), f"{name}: {key}"
    if labelled:
        assert any(g.abs().sum() > 0 for g in got[1].values())


def _random_family_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if model_type == "gemma4_text":  # as the tiny gemma family model (ftpipe/training/families.py)
        extra = {"global_head_dim": 8, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0,
                 "sliding_window": 16}
    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64,
                                  tie_word_embeddings=model_type in ("gemma", "llama", "gemma4_text"),
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)  # within the small vocabulary
    if model_type in ("gemma2", "gemma3_text", "gemma4_text"):
        config.final_logit_softcapping = 2.0  # small: the cap changes the logits of a random model
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").train()


TESTED_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gemma4_text", "smollm3",
                   "phi3", "olmo2"]


@pytest.mark.parametrize("model_type", TESTED_FAMILIES)
def test_labelled_head_equals_each_familys_own_loss(model_type, monkeypatch):
    """Every family in LABELLED_HEAD_MODELS (the list and this test agree: see the test below): the loss and every gradient (LM head included) equal transformers'."""
    from ftpipe.training import cpu_fastpath

    monkeypatch.setattr(cpu_fastpath, "LABELLED_HEAD_CHUNK_BYTES", 7 * 4 * 300)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :12] = -100  # a prompt
    labels[1, 5:9] = -100
    model = _random_family_model(model_type)
    want_loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert cpu_fastpath.add_labelled_head(model)
    out = model(input_ids=ids, labels=labels, labelled_head=True)
    loss = out.nll_sum / out.label_count
    loss.backward()
    assert int(out.label_count) == int((labels[:, 1:] != -100).sum())
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    # Gemma 4's scaled, tied embedding sums the head's and the input's gradient in another order:
    # fp32 rounding of ~2e-7 on entries of ~5e-4 (the loss is equal to 1e-7 relative).
    atol = 1e-6 if model_type == "gemma4_text" else 1e-7
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=atol, msg=name)
    with torch.no_grad():  # without the keyword the forward is the model's own
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want_loss.detach())


def test_labelled_head_under_bf16_autocast_follows_the_models_own_loss():
    """With bf16 autocast (CPUs with native bf16) the head's matmuls run in bf16, as the model's own head does."""
    from ftpipe.training.cpu_fastpath import add_labelled_head

    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :12] = -100
    model = _random_family_model("gemma2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids, labels=labels, use_cache=False).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert add_labelled_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels, labelled_head=True)
    (out.nll_sum / out.label_count).backward()
    assert (out.nll_sum / out.label_count).item() == pytest.approx(want.item(), rel=1e-4)
    for name, grad in want_grads.items():  # bf16 gradients: the same up to rounding
        assert (model.get_parameter(name).grad - grad).norm() <= 0.03 * grad.norm() + 1e-6, name


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_labelled_nll_with_bias_equals_autograd(softcap):
    """The chunked function, biased head and softcap included: loss, entropy, argmax count and gradients."""
    from ftpipe.training.cpu_fastpath import _labelled_nll

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    z = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    want = torch.nn.functional.nll_loss(logp, targets, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.5, (hidden, weight, bias))
    nll, entropy, correct = _labelled_nll().apply(hidden, weight, bias, targets, softcap, 4, True)
    got_grads = torch.autograd.grad(nll * 0.5, (hidden, weight, bias))
    assert nll.item() == pytest.approx(want.item(), rel=1e-6)
    assert entropy.item() == pytest.approx(-(logp.exp() * logp).sum().item(), rel=1e-6)
    assert int(correct) == int((logp.argmax(-1) == targets).sum())
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: none computed
        nll = _labelled_nll().apply(hidden, weight, bias, targets, softcap, 4, False)[0]
    assert nll.item() == pytest.approx(want.item(), rel=1e-6)


def test_labelled_head_is_only_used_where_it_is_exact(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftpipe.training.cpu_fastpath import add_labelled_head

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    other.config.model_type = "cohere"  # scales its logits: not in LABELLED_HEAD_MODELS
    forward = other.forward
    assert not add_labelled_head(other) and other.forward == forward
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                             LoraConfig(r=4, target_modules=["lm_head"]))  # an adapter on the head itself
    assert not add_labelled_head(wrapped.get_base_model())


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


def test_every_family_of_make_tiny_model_takes_the_labelled_head():
    """`make-tiny-model --family` families all train through the labelled head (each one's equivalence: above)."""
    from ftpipe.training.cpu_fastpath import LABELLED_HEAD_MODELS
    from ftpipe.training.families import FAMILIES

    from transformers import CONFIG_MAPPING

    assert sorted(TESTED_FAMILIES) == sorted(LABELLED_HEAD_MODELS)
    types = {CONFIG_MAPPING[k].__name__: k for k in CONFIG_MAPPING}
    for family in FAMILIES.values():
        model_type = types[family.architecture]
        assert model_type in LABELLED_HEAD_MODELS, family.name
        assert model_type in TESTED_FAMILIES, family.name
