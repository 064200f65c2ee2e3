"""`export-gguf`: convert the run's merged model to GGUF and verify it in llama.cpp.

Pipeline position: export-merged -> **export-gguf** -> ollama-load / serve (llama.cpp).
Runs in the gguf environment (.venv-gguf: llama-cpp-python + transformers + the converter that
`scripts/post-install-gguf.sh` unpacks from the pinned llama-cpp-python sdist).

    ftpipe export-gguf --config debug_config.yaml --run my-run

The stage contract (`ftpipe/core/stage.py`):

- `check(ctx)`: the HF folder to convert (--from, else the run's completed merged model) must be a
  complete model, not an adapter alone (which "converts" into a model that lacks the base
  weights), with a tokenizer llama.cpp reads as HF does. Also the host pre-flight before
  delegating: it imports no llama_cpp.
- `plan(ctx) -> ExportGgufPlan`: that folder, the llama.cpp converter tree of this environment and
  the GGUF types to write.
- `run(ctx, plan)`: run `convert_hf_to_gguf.py` through `ftpipe.export.gguf_convert` (which maps
  plain byte-level BPE tokenizers to the "gpt-2" pre-tokenizer) for f16; make q8_0 and q4_k_m from
  that file with llama-quantize (or the same quantizer through llama-cpp-python's binding), as
  llama.cpp's own workflow does, so the converter runs once per export; then load every GGUF
  with llama-cpp-python and check: tokenization equals HF's on the prompts and on fixed probe
  texts (non-ASCII, whitespace, every special token inside text), greedy tokens equal the HF
  merged model's, `tokenizer.chat_template` and the EOS id are in the metadata, every end-of-turn
  id of generation_config is an end-of-generation token in llama.cpp, and the embedded template
  renders the same token ids as HF's `apply_chat_template`. Files are written to a temp folder and
  renamed to `gguf/` only when all checks pass.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.executor import run_tool
from ftpipe.core.runs import Project, gguf_name
from ftpipe.core.stage import StageContext, StageResult, require_upstream, upstream_state
from ftpipe.export.artifacts import (
    fresh_tmp_dir,
    is_adapter_only,
    replace_dir,
    require_full_model,
)
from ftpipe.handoff.chat_template import generation_eos_ids
from ftpipe.handoff.prepared import prompt, sample_conversations

log = logging.getLogger(__name__)

CONVERTER_ENV = "FTPIPE_LLAMA_CPP_DIR"  # set in the llama-cpp Compose image
# Made from the f16 file by llama-quantize: the converter (seconds to a minute for a large
# vocabulary) runs once, whatever the types asked for.
QUANTIZED_BY_TOOL = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
GREEDY_NOT_ENFORCED = {"q4_k_m"}  # 4-bit legitimately changes argmaxes: reported, not enforced
# Texts every GGUF must tokenize exactly as HF does, besides the sample prompts: non-ASCII
# (accents, CJK, emoji: byte fallback and byte-level merges), whitespace runs, digits, code. Each
# special token of the tokenizer is also probed inside text (`_probe_texts`). A wrong or
# mis-recognised pre-tokenizer shows up here even when the sample prompts are plain English.
TOKENIZER_PROBES = (
    "Hello world! How are you?",
    "Grüße aus Köln: naïve café, São Paulo, Ærøskøbing, Ελληνικά, русский.",
    "你好，世界。日本語のテキスト、한국어 텍스트.",
    "emoji 🙂👍🏽 and symbols ∑∫√ ≠ ≤ ° € £",
    "  two leading spaces,\ttab,\n\nnewlines\r\n and trailing   ",
    "numbers 1234567890 3.14159 1,000,000",
    "def f(x):\n    return x**2  # code",
)


@dataclass(frozen=True)
class ExportGgufPlan:
    """What export-gguf converts, with which converter, into which files."""

    source: Path  # the HF model folder converted: --from, else outputs/<run>/merged
    output: Path  # outputs/<run>/gguf
    converter: Path  # the llama.cpp tree holding convert_hf_to_gguf.py and gguf-py
    outtypes: tuple[str, ...]  # gguf.outtypes without repeats, in order
    convert_log: Path  # the converter's and quantizer's output


def check(ctx: StageContext) -> dict[str, Path]:
    """The HF folder to convert, checked before any heavy work; runs on the host before delegating too.

    Returns:
        The inputs: the --from folder, else export-merged's manifest.

    Raises:
        InputError: adapter-only input, incomplete folder, or no merged model in the run.
    """
    return _source(ctx)[1]


def _source(ctx: StageContext) -> tuple[Path, dict[str, Path]]:
    """(the folder to convert, the inputs to hash): `ctx.options["source"]` (--from), else the run's
    merged model.

    Raises:
        InputError: as `check`.
    """
    run, project = ctx.run, ctx.project
    hint = f"ftpipe export-merged --run {run.name}"
    source = ctx.options.get("source")
    if source is not None:
        folder = project.resolve(source)
        require_full_model(folder, project, hint=hint)
        require_convertible_tokenizer(folder, project)
        return folder, {"model": folder}
    if upstream_state(run, "export-merged") == "missing" and is_adapter_only(run.adapter):
        require_full_model(run.adapter, project, hint=hint)  # raises the adapter-only message
    require_upstream(ctx)
    require_full_model(run.merged, project, hint=f"{hint} --force")
    require_convertible_tokenizer(run.merged, project)
    return run.merged, {"export-merged": run.manifest_path("export-merged")}


def plan(ctx: StageContext) -> ExportGgufPlan:
    """The folder to convert (checked again), the converter of this environment, the GGUF types.

    Raises:
        InputError: as `check`; the llama.cpp converter is not installed.
    """
    cfg = ctx.config.gguf
    source, _ = _source(ctx)
    converter = converter_dir(cfg.converter_dir, ctx.project)
    log.info("converter: %s", converter / "convert_hf_to_gguf.py")
    return ExportGgufPlan(
        source=source,
        output=ctx.run.gguf,
        converter=converter,
        outtypes=tuple(dict.fromkeys(cfg.outtypes)),
        convert_log=ctx.log_dir / "convert.log",
    )


def require_convertible_tokenizer(folder: Path, project: Project) -> None:
    """Refuse, before converting, a tokenizer llama.cpp cannot load or would split differently.

    - tokenizer.model must be a SentencePiece model SentencePiece loads: one UNKNOWN piece at
      most (the converter reads it with sentencepiece, which stops at "unk is already defined").
    - A SentencePiece vocabulary (tokenizer.model, or byte-fallback BPE) pre-tokenized by
      Metaspace with prepend_scheme "first" (transformers' non-legacy Llama-2 tokenizer) puts no
      "▁" after a special token; llama.cpp's SentencePiece tokenizer puts one after every special
      token (the legacy behaviour, which Llama 2 / Mistral v0.1 / Phi-3 ship as a Prepend
      normalizer). Every chat prompt (`<s>[INST]...`) would then be read differently by a GGUF
      runtime than the model was trained on.

    Raises:
        InputError: naming the folder, what is wrong and the next command.
    """
    import json

    where = project.rel(folder)
    spm = folder / "tokenizer.model"
    if spm.is_file():
        from transformers.utils import sentencepiece_model_pb2_new as pb

        model = pb.ModelProto()
        try:
            model.ParseFromString(spm.read_bytes())
        except Exception as exc:  # protobuf's DecodeError: the file is not a ModelProto
            raise InputError(f"export-gguf: {where}/tokenizer.model is not a SentencePiece model ({exc})",
                             hint="rebuild the base model's tokenizer, then ftpipe export-merged --force") from None
        unknown = [p.piece for p in model.pieces if p.type == pb.ModelProto.SentencePiece.UNKNOWN]
        if len(unknown) > 1:
            raise InputError(
                f"export-gguf: {where}/tokenizer.model has {len(unknown)} pieces typed UNKNOWN ({', '.join(unknown[:3])}...); "
                "SentencePiece allows one, so llama.cpp's converter cannot load it",
                hint="rebuild the base model's tokenizer.model (extra pieces typed UNUSED), then ftpipe export-merged --force",
            )
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    pre = data.get("pre_tokenizer") or {}
    sentencepiece = spm.is_file() or bool((data.get("model") or {}).get("byte_fallback"))
    if sentencepiece and pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        raise InputError(
            f"export-gguf: the tokenizer in {where} (SentencePiece vocabulary, Metaspace prepend_scheme 'first') "
            "puts no '▁' after special tokens, llama.cpp puts one after each: a GGUF would read chat prompts "
            "differently from the model",
            hint="serve the merged model with vLLM (ftpipe serve --artifact merged), or use a base whose tokenizer "
            "prepends '▁' per segment (legacy Prepend normalizer)",
        )


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


def run(ctx: StageContext, plan: ExportGgufPlan) -> StageResult:
    """Convert, quantize, verify, move into place.

    Raises:
        StageError: the converter or quantizer failed, or a GGUF does not match the HF model.
    """
    project = ctx.project
    tmp = fresh_tmp_dir(plan.output)
    try:
        files = _convert_all(plan.source, tmp, plan.converter, list(plan.outtypes), plan.convert_log)
        metrics = verify(plan.source, files, project, ctx.config.data.name, ctx.config.gguf)
        replace_dir(tmp, plan.output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    metrics["converter"] = "llama.cpp convert_hf_to_gguf.py from " + _converter_origin(plan.converter)
    outputs = [plan.output / gguf_name(t) for t in plan.outtypes]
    sizes = ", ".join(f"{t} {p.stat().st_size / 1e6:.1f} MB" for t, p in zip(plan.outtypes, outputs))
    return StageResult(outputs=outputs, metrics=metrics, summary=f"GGUF -> {project.rel(plan.output)} ({sizes})")


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
                hint="keep only f16 in gguf.outtypes, or bash scripts/bootstrap.sh gguf",
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
    end_of_turn = _generation_eos(source, tokenizer)
    probes = _probe_texts(tokenizer, end_of_turn)
    probe_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in probes]

    metrics: dict = {"verify_source": sample_source, "verify_prompts": len(prompts)}
    problems: list[str] = []
    for outtype, path in files.items():
        result = _check_gguf(path, prompts + probes, prompt_ids + probe_ids, reference, tokenizer, roundtrip_conv,
                             hf_chat_ids, end_of_turn, cfg)
        for key, value in result.items():
            if key != "problems":
                metrics[f"{outtype}_{key}"] = value
        enforce_greedy = outtype not in GREEDY_NOT_ENFORCED
        problems += [f"{outtype}: {p}" for p in result["problems"] if enforce_greedy or not p.startswith("greedy")]
        if not enforce_greedy and any(p.startswith("greedy") for p in result["problems"]):
            log.warning("%s: greedy tokens differ from HF (reported, not enforced for 4-bit)", outtype)
        metrics[f"{outtype}_bytes"] = path.stat().st_size
    if problems:
        raise StageError(f"GGUF verification failed: {'; '.join(problems)}", hint="see the run.log of export-gguf")
    return metrics


def _generation_eos(source: Path, tokenizer) -> list[int]:
    """The ids generation stops at: generation_config.json's eos_token_id (every end-of-turn
    token export-merged put there), else the tokenizer's EOS."""
    return generation_eos_ids(source) or [tokenizer.eos_token_id]


def _probe_texts(tokenizer, end_of_turn: list[int]) -> list[str]:
    """TOKENIZER_PROBES plus one text per special token (BOS, EOS, pad, every end-of-turn token)
    between ordinary words, as a chat template writes them."""
    specials = list(dict.fromkeys(
        [*tokenizer.all_special_tokens, *tokenizer.convert_ids_to_tokens(end_of_turn)]
    ))
    return [*TOKENIZER_PROBES, *(f"The answer is yes.{tok}\nNext turn: ñandú {tok} done" for tok in specials if tok)]


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


def _check_gguf(path, texts, text_ids, reference, tokenizer, conversation, hf_chat_ids, end_of_turn, cfg) -> dict:
    """One GGUF loaded in llama.cpp against the HF model: its metrics, and its problems under "problems".

    `texts` = the sample prompts (first len(reference)) then the tokenizer probes.
    """
    from llama_cpp import Llama

    prompt_ids = text_ids[: len(reference)]
    longest = max(len(ids) for ids in prompt_ids) + cfg.verify_new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=max(256, longest), n_threads=min(os.cpu_count() or 1, 2),
                logits_all=True, verbose=False, seed=0)
    problems: list[str] = []
    out: dict = {}
    out.update(_check_tokenization(llm, texts, text_ids, problems))
    out.update(_check_greedy(llm, path, prompt_ids, reference, cfg, problems))
    template = llm.metadata.get("tokenizer.chat_template")
    out.update(_check_metadata(llm, template, tokenizer, problems))
    out.update(_check_end_of_turn(llm, tokenizer, end_of_turn, problems))
    if template:
        out.update(_check_template_roundtrip(llm, template, tokenizer, conversation, hf_chat_ids, problems))
    llm.close()
    out["problems"] = problems
    return out


def _check_tokenization(llm, texts, text_ids, problems: list[str]) -> dict:
    """The same text gives the same ids (a wrong pre-tokenizer shows up here)."""
    differ = [text for text, ids in zip(texts, text_ids)
              if llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) != ids]
    if differ:
        problems.append(f"llama.cpp tokenizes {len(differ)} of {len(texts)} texts differently from HF "
                        f"(first: {differ[0][:60]!r})")
    return {"tokenization_equal": not differ, "tokenization_texts": len(texts)}


def _check_greedy(llm, path: Path, prompt_ids, reference, cfg, problems: list[str]) -> dict:
    """Greedy tokens from the same prompt ids as HF's; a differing token within
    gguf.greedy_tie_tolerance of HF's choice is a near-tie, not a problem."""
    import numpy as np

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
    return {"greedy_equal": f"{equal}/{len(prompt_ids)}", "greedy_near_ties": ties,
            "max_abs_logit_diff_first_step": round(max_diff, 6)}


def _check_metadata(llm, template: str | None, tokenizer, problems: list[str]) -> dict:
    """The chat template and HF's EOS id are in the GGUF metadata."""
    if not template:
        problems.append("tokenizer.chat_template missing from the GGUF metadata")
    if llm.token_eos() != tokenizer.eos_token_id:
        problems.append(f"EOS id {llm.token_eos()} in the GGUF, HF tokenizer has {tokenizer.eos_token_id}")
    return {"chat_template_present": bool(template), "eos_token_id": llm.token_eos()}


def _check_end_of_turn(llm, tokenizer, end_of_turn: list[int], problems: list[str]) -> dict:
    """llama.cpp stops generating at its end-of-generation (EOG) tokens; every id generation_config
    stops at must be one, or a GGUF runtime talks past the end of its turn."""
    import llama_cpp

    vocab = llm._model.vocab
    not_eog = [i for i in end_of_turn if not llama_cpp.llama_vocab_is_eog(vocab, i)]
    if not_eog:
        problems.append(f"end-of-turn ids {not_eog} ({', '.join(tokenizer.convert_ids_to_tokens(not_eog))}) "
                        "are not end-of-generation tokens in the GGUF")
    return {"eot_token_id": llm._model.token_eot(), "end_of_turn_ids": end_of_turn}


def _check_template_roundtrip(llm, template: str, tokenizer, conversation, hf_chat_ids, problems: list[str]) -> dict:
    """The embedded template, rendered as llama-cpp-python renders it, gives HF's token ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    rendered = Jinja2ChatFormatter(
        template=template, eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or ""
    )(messages=prompt(conversation)).prompt
    # Tokenized as llama.cpp's runtime does: its own BOS rule unless the text already starts
    # with BOS (so a template that relies on a BOS the GGUF will not add shows up here).
    bos_text = tokenizer.bos_token or ""
    runtime_bos = not (bos_text and rendered.startswith(bos_text))
    gguf_ids = llm.tokenize(rendered.encode("utf-8"), add_bos=runtime_bos, special=True)
    out: dict = {"chat_template_roundtrip_equal": gguf_ids == hf_chat_ids}
    if gguf_ids != hf_chat_ids:
        first = next((i for i, (a, b) in enumerate(zip(gguf_ids, hf_chat_ids)) if a != b), min(len(gguf_ids), len(hf_chat_ids)))
        out["chat_template_roundtrip_first_diff"] = first
        problems.append(f"the embedded chat template renders different token ids from HF (first difference at {first})")
    return out
