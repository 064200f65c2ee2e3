"""`export-gguf`: convert the run's merged model to GGUF and verify it in llama.cpp.

Pipeline position: export-merged -> **export-gguf** -> ollama-load / serve (llama.cpp).
Runs in the gguf environment (.venv-gguf: llama-cpp-python + transformers + the converter that
`scripts/post-install-gguf.sh` unpacks from the pinned llama-cpp-python sdist).

    ftpipe export-gguf --config debug_config.yaml --run my-run

Steps: refuse anything but a complete merged model (an adapter alone "converts" into a model that
lacks the base weights); run `convert_hf_to_gguf.py` through `ftpipe.export.gguf_convert` (which
maps plain byte-level BPE tokenizers to the "gpt-2" pre-tokenizer) for f16 / q8_0; make q4_k_m
with llama-quantize (or the same quantizer through llama-cpp-python's binding); then load every
GGUF with llama-cpp-python and check: prompt tokenization equals HF's, greedy tokens equal the HF
merged model's, `tokenizer.chat_template` and the EOS id are in the metadata, and the embedded
template renders the same token ids as HF's `apply_chat_template`. Files are written to a temp
folder and renamed to `gguf/` only when all checks pass.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.executor import run_tool
from ftpipe.core.runs import Project, RunDir
from ftpipe.core.stage import StageContext, StageResult, require_upstream, upstream_state
from ftpipe.export.artifacts import (
    fresh_tmp_dir,
    gguf_name,
    is_adapter_only,
    replace_dir,
    require_full_model,
)
from ftpipe.handoff.prepared import prompt, sample_conversations

log = logging.getLogger(__name__)

CONVERTER_ENV = "FTPIPE_LLAMA_CPP_DIR"  # set in the llama-cpp Compose image
QUANTIZED_BY_TOOL = {"q4_k_m": "Q4_K_M"}  # made from the f16 file by llama-quantize


def prepare(ctx: StageContext) -> dict[str, Path]:
    """The HF folder to convert (`ctx.options["source"]`, from --from, else the run's merged model),
    checked before any heavy work; runs on the host before delegating too.

    Raises:
        InputError: adapter-only input, incomplete folder, or no merged model in the run.
    """
    run, project = ctx.run, ctx.project
    hint = f"ftpipe export-merged --run {run.name}"
    source = ctx.options.get("source")
    if source is not None:
        folder = project.resolve(source)
        require_full_model(folder, project, hint=hint)
        ctx.options["source"] = folder
        return {"model": folder}
    if upstream_state(run, "export-merged") == "missing" and is_adapter_only(run.adapter):
        require_full_model(run.adapter, project, hint=hint)  # raises the adapter-only message
    require_upstream(ctx)
    require_full_model(run.merged, project, hint=f"{hint} --force")
    ctx.options["source"] = run.merged
    return {"export-merged": run.manifest_path("export-merged")}


def converter_dir(cfg_dir: str | None, project: Project) -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py and gguf-py.

    Raises:
        InputError: not found, naming the command that installs it.
    """
    candidates = [project.resolve(cfg_dir)] if cfg_dir else []
    if os.environ.get(CONVERTER_ENV):
        candidates.append(Path(os.environ[CONVERTER_ENV]))
    candidates.append(Path(sys.prefix) / "share" / "llama.cpp")
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir():
            return folder
    raise InputError(
        f"llama.cpp converter not found (looked in {', '.join(str(c) for c in candidates)})",
        hint="bash scripts/bootstrap.sh gguf (or set gguf.converter_dir)",
    )


def run(ctx: StageContext) -> StageResult:
    """Convert, quantize, verify, move into place."""
    run: RunDir = ctx.run
    project, cfg = ctx.project, ctx.config.gguf
    source: Path = ctx.options["source"]
    llama_cpp = converter_dir(cfg.converter_dir, project)
    log.info("converter: %s", llama_cpp / "convert_hf_to_gguf.py")

    tmp = fresh_tmp_dir(run.gguf)
    try:
        files = _convert_all(source, tmp, llama_cpp, cfg.outtypes, ctx.log_dir / "convert.log")
        metrics = verify(source, files, project, ctx.config.data.name, cfg)
        replace_dir(tmp, run.gguf)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    metrics["converter"] = "llama.cpp convert_hf_to_gguf.py from " + _converter_origin(llama_cpp)
    outtypes = list(dict.fromkeys(cfg.outtypes))
    outputs = [run.gguf / gguf_name(t) for t in outtypes]
    sizes = ", ".join(f"{t} {p.stat().st_size / 1e6:.1f} MB" for t, p in zip(outtypes, outputs))
    return StageResult(outputs=outputs, metrics=metrics, summary=f"GGUF -> {project.rel(run.gguf)} ({sizes})")


def _converter_origin(llama_cpp: Path) -> str:
    origin = llama_cpp / "FTPIPE_ORIGIN"
    return origin.read_text(encoding="utf-8").strip() if origin.is_file() else str(llama_cpp)


def _convert_all(source: Path, out: Path, llama_cpp: Path, outtypes: list[str], log_file: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    wanted = list(dict.fromkeys(outtypes))
    direct = [t for t in wanted if t not in QUANTIZED_BY_TOOL]
    if any(t in QUANTIZED_BY_TOOL for t in wanted) and "f16" not in direct:
        direct.append("f16")  # the quantizer's input; removed below when not asked for
    for outtype in direct:
        target = out / gguf_name(outtype)
        run_tool(
            [sys.executable, "-m", "ftpipe.export.gguf_convert", llama_cpp, source,
             "--outfile", target, "--outtype", outtype],
            log_file=log_file,
        )
        if not target.is_file():
            raise StageError(f"the converter exited 0 but wrote no {target.name}")
        files[outtype] = target
    for outtype in wanted:
        if outtype in QUANTIZED_BY_TOOL:
            files[outtype] = quantize(files["f16"], out / gguf_name(outtype), outtype, log_file)
    if "f16" not in wanted:
        files.pop("f16").unlink()
    return files


def quantize(src: Path, dst: Path, outtype: str, log_file: Path) -> Path:
    """k-quantize `src` with `llama-quantize` when on PATH / in the venv, else llama-cpp-python's
    binding of the same library function (`llama_model_quantize`).

    Raises:
        StageError: neither is available, or quantization failed.
    """
    ftype = QUANTIZED_BY_TOOL[outtype]
    tool = shutil.which("llama-quantize") or shutil.which("llama-quantize", path=str(Path(sys.prefix) / "bin"))
    if tool:
        run_tool([tool, src, dst, ftype], log_file=log_file)
    else:
        try:
            import llama_cpp
        except ImportError:
            raise StageError(
                f"{outtype} needs llama-quantize or llama-cpp-python; neither is available here",
                hint="drop q4_k_m from gguf.outtypes, or bash scripts/bootstrap.sh gguf",
            ) from None
        log.info("llama-quantize not found: quantizing %s with llama_cpp.llama_model_quantize", outtype)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = min(os.cpu_count() or 1, 4)
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if code != 0:
            raise StageError(f"llama_model_quantize({src.name} -> {ftype}) returned {code}")
    if not dst.is_file():
        raise StageError(f"quantization to {outtype} wrote no {dst.name}")
    return dst


def verify(source: Path, files: dict[str, Path], project: Project, dataset: str, cfg) -> dict:
    """Load each GGUF in llama.cpp and compare with the HF model; returns the metrics.

    Raises:
        StageError: tokenization, greedy tokens (beyond near-ties), chat template or EOS differ.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    conversations, sample_source = sample_conversations(project, dataset, cfg.verify_prompts)
    prompts = [
        tokenizer.apply_chat_template(prompt(c), tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    reference = [_hf_greedy(model, ids, cfg.verify_new_tokens) for ids in prompt_ids]
    roundtrip_conv = max(conversations, key=len)
    hf_chat_ids = prompt_ids[conversations.index(roundtrip_conv)]

    metrics: dict = {"verify_source": sample_source, "verify_prompts": len(prompts)}
    problems: list[str] = []
    for outtype, path in files.items():
        result = _check_gguf(path, prompts, prompt_ids, reference, tokenizer, roundtrip_conv, hf_chat_ids, cfg)
        for key, value in result.items():
            if key != "problems":
                metrics[f"{outtype}_{key}"] = value
        enforce_greedy = outtype not in QUANTIZED_BY_TOOL  # 4-bit legitimately changes argmaxes
        problems += [f"{outtype}: {p}" for p in result["problems"] if enforce_greedy or not p.startswith("greedy")]
        if not enforce_greedy and any(p.startswith("greedy") for p in result["problems"]):
            log.warning("%s: greedy tokens differ from HF (reported, not enforced for 4-bit)", outtype)
        metrics[f"{outtype}_bytes"] = path.stat().st_size
    if problems:
        raise StageError(f"GGUF verification failed: {'; '.join(problems)}", hint="see the run.log of export-gguf")
    return metrics


def _hf_greedy(model, ids: list[int], n: int) -> list[tuple[int, object]]:
    """Greedy continuation: per step the chosen token and HF's full logits (for near-tie checks)."""
    import torch

    seq, steps = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            token = int(logits.argmax())
            steps.append((token, logits))
            seq.append(token)
    return steps


def _check_gguf(path, prompts, prompt_ids, reference, tokenizer, conversation, hf_chat_ids, cfg) -> dict:
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    longest = max(len(ids) for ids in prompt_ids) + cfg.verify_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=max(256, longest), n_threads=min(os.cpu_count() or 1, 2),
                logits_all=True, verbose=False, seed=0)
    problems: list[str] = []
    out: dict = {}

    # Tokenization: the same text gives the same ids (wrong pre-tokenizer shows up here).
    tok_equal = all(
        llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
        for text, ids in zip(prompts, prompt_ids)
    )
    out["tokenization_equal"] = tok_equal
    if not tok_equal:
        problems.append("llama.cpp tokenizes the sample prompts differently from HF")

    # Greedy tokens from the same prompt ids.
    equal = ties = 0
    max_diff = 0.0
    for ids, ref in zip(prompt_ids, reference):
        llm.reset()
        llm.eval(ids)
        got: list[int] = []
        for step, (hf_token, hf_logits) in enumerate(ref):
            scores = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            if step == 0:
                max_diff = max(max_diff, float(np.abs(scores - hf_logits.numpy()).max()))
            token = int(scores.argmax())
            got.append(token)
            if token != hf_token:
                gap = float(hf_logits.max() - hf_logits[token])
                if gap <= cfg.greedy_tie_tolerance:
                    ties += 1
                    log.info("%s: near-tie at step %d (HF logit gap %.3g): %d vs %d", path.name, step, gap, token, hf_token)
                else:
                    problems.append(
                        f"greedy token {step} is {token}, HF chose {hf_token} (HF logit gap {gap:.3g} > "
                        f"gguf.greedy_tie_tolerance {cfg.greedy_tie_tolerance})"
                    )
                break  # the contexts differ from here on
            llm.eval([token])
        equal += got == [t for t, _ in ref]
    out["greedy_equal"] = f"{equal}/{len(prompt_ids)}"
    out["greedy_near_ties"] = ties
    out["max_abs_logit_diff_first_step"] = round(max_diff, 6)

    # Metadata: chat template and EOS.
    template = llm.metadata.get("tokenizer.chat_template")
    out["chat_template_present"] = bool(template)
    if not template:
        problems.append("tokenizer.chat_template missing from the GGUF metadata")
    eos_ok = llm.token_eos() == tokenizer.eos_token_id
    out["eos_token_id"] = llm.token_eos()
    if not eos_ok:
        problems.append(f"EOS id {llm.token_eos()} in the GGUF, HF tokenizer has {tokenizer.eos_token_id}")

    # Chat-template round trip: the embedded template, rendered as llama-cpp-python renders it.
    if template:
        rendered = Jinja2ChatFormatter(
            template=template, eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or ""
        )(messages=prompt(conversation)).prompt
        # Tokenized as llama.cpp's runtime does: its own BOS rule unless the text already starts
        # with BOS (so a template that relies on a BOS the GGUF will not add shows up here).
        bos_text = tokenizer.bos_token or ""
        runtime_bos = not (bos_text and rendered.startswith(bos_text))
        gguf_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=runtime_bos, special=True)
        out["chat_template_roundtrip_equal"] = gguf_ids == hf_chat_ids
        if gguf_ids != hf_chat_ids:
            first = next((i for i, (a, b) in enumerate(zip(gguf_ids, hf_chat_ids)) if a != b), min(len(gguf_ids), len(hf_chat_ids)))
            out["chat_template_roundtrip_first_diff"] = first
            problems.append(f"the embedded chat template renders different token ids from HF (first difference at {first})")
    llm.close()
    out["problems"] = problems
    return out
