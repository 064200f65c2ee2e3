"""One model identity (`ModelRef`) and its one resolver.

A base model is a local folder or a hub id with a pinned revision. `resolve_model` turns the
`model` config section into something `from_pretrained` can load, honouring offline mode
(`HF_HUB_OFFLINE=1`) and the standard proxy / CA-bundle / `HF_ENDPOINT` variables, which
huggingface_hub reads itself: TLS verification is never switched off here. Model ids are never
rewritten by string surgery.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ftpipe.core.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: what `from_pretrained` gets, and what manifests record."""

    id: str | None
    revision: str | None
    path: str | None  # absolute local folder when local

    @property
    def load_from(self) -> str:
        """The argument for `from_pretrained` (a local folder or the hub id)."""
        return self.path or self.id  # type: ignore[return-value]

    def record(self, root: Path) -> dict:
        """Manifest form: paths relative to the project root."""
        data = asdict(self)
        if self.path:
            try:
                data["path"] = Path(self.path).relative_to(root).as_posix()
            except ValueError:
                pass
        return data

    def pretrained_kwargs(self) -> dict:
        """revision for hub loads; nothing extra for local folders."""
        return {} if self.path else {"revision": self.revision}


def offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model(model_cfg, root: Path) -> ModelRef:
    """Resolve the `model` config section.

    A local `path` wins; it must hold a config.json. A hub `id` is used as is (with `revision`);
    in offline mode it must already be in the local cache.

    Raises:
        InputError: local folder missing or incomplete; hub model not cached while offline.
    """
    if model_cfg.path:
        folder = Path(model_cfg.path)
        folder = folder if folder.is_absolute() else (root / folder)
        if not (folder / "config.json").is_file():
            hint = (
                f"ftpipe make-tiny-model --out {model_cfg.path}"
                if model_cfg.tiny is not None
                else "check model.path, or set model.id to a hub id"
            )
            raise InputError(f"model.path {model_cfg.path}: no config.json there", hint=hint)
        return ModelRef(id=model_cfg.id, revision=model_cfg.revision, path=str(folder.resolve()))
    if model_cfg.revision is None:
        log.warning("model.id %s has no pinned model.revision: results may change upstream", model_cfg.id)
    if offline():
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(model_cfg.id, revision=model_cfg.revision, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any cache miss means the same thing here
            raise InputError(
                f"model.id {model_cfg.id}: not in the local cache and HF_HUB_OFFLINE=1 ({type(exc).__name__})",
                hint=f"unset HF_HUB_OFFLINE once, or `hf download {model_cfg.id}`",
            ) from None
        return ModelRef(id=model_cfg.id, revision=model_cfg.revision, path=local)
    return ModelRef(id=model_cfg.id, revision=model_cfg.revision, path=None)
