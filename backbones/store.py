"""The model store: exported ONNX backbones keyed by everything that determines their output.

Layout: ``<root>/<key>/model.onnx`` + ``<root>/<key>/meta.json``. An entry is written in a temporary
folder and renamed into place, so an interrupted export never leaves an entry that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tlpipe.errors import TlpipeError

from .atomic import atomic_folder
from .weights import sha256_file

__all__ = [
    "META_FILE",
    "MODEL_FILE",
    "ModelStore",
    "STORE_ENV",
    "StoreEntry",
    "StoreError",
    "default_store_root",
    "make_key",
]

STORE_ENV = "TLPIPE_MODEL_STORE"
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"


class StoreError(TlpipeError, RuntimeError):
    """A store entry is missing, invalid or does not match its recorded hash."""


def default_store_root() -> Path:
    value = os.environ.get(STORE_ENV)
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tlpipe" / "models"


def make_key(prefix: str, fields: dict) -> str:
    """Readable prefix + 16 hex digits of the sha256 of the canonical JSON of ``fields``."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return f"{prefix}-{hashlib.sha256(blob).hexdigest()[:16]}"


@dataclass(frozen=True)
class StoreEntry:
    key: str
    directory: Path
    metadata: dict

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def embedding_dim(self) -> int:
        return int(self.metadata["embedding_dim"])

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    def verify(self) -> None:
        """Raise StoreError when model.onnx does not hash to what meta.json recorded."""
        actual = sha256_file(self.model_path)
        if actual != self.metadata.get("model_sha256"):
            raise StoreError(
                f"model store entry {self.directory} is corrupt: model.onnx sha256 {actual[:12]}… "
                f"does not match its metadata; delete the folder and export again"
            )


class ModelStore:
    """A folder of exported models (``~/.cache/tlpipe/models`` unless told otherwise)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_store_root()

    def get(self, key: str, verify: bool = False) -> StoreEntry | None:
        """The entry for ``key``, or None. ``verify`` re-hashes the model file."""
        directory = self.root / key
        meta = directory / META_FILE
        if not meta.is_file() or not (directory / MODEL_FILE).is_file():
            return None
        entry = StoreEntry(key, directory, json.loads(meta.read_text()))
        if verify:
            entry.verify()
        return entry

    def put(self, key: str, model_bytes: bytes, metadata: dict) -> StoreEntry:
        """Write an entry atomically; if another process won the race, keep theirs."""
        with atomic_folder(self.root / key, keep_existing=True) as tmp:
            (tmp / MODEL_FILE).write_bytes(model_bytes)
            meta = {**metadata, "key": key, "model_sha256": hashlib.sha256(model_bytes).hexdigest()}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        entry = self.get(key)
        assert entry is not None
        return entry

    def entries(self) -> list[StoreEntry]:
        if not self.root.is_dir():
            return []
        found = (self.get(p.name) for p in sorted(self.root.iterdir()) if not p.name.startswith("."))
        return [e for e in found if e is not None]

    def find(self, **fields) -> list[StoreEntry]:
        """Entries whose metadata match every field given, newest first."""
        matches = [e for e in self.entries() if all(e.metadata.get(k) == v for k, v in fields.items())]
        return sorted(matches, key=lambda e: e.metadata.get("created", ""), reverse=True)

    def resolve(self, ref: str | os.PathLike) -> StoreEntry:
        """An entry from a key, an entry folder, or a folder/file holding one (e.g. a fine-tune output)."""
        path = Path(ref).expanduser()
        for directory in (path, path.parent, path / "backbone"):
            if (directory / META_FILE).is_file() and (directory / MODEL_FILE).is_file():
                meta = json.loads((directory / META_FILE).read_text())
                return StoreEntry(meta.get("key", directory.name), directory, meta)
        entry = self.get(str(ref))
        if entry is None:
            raise StoreError(f"{ref} is neither a model-store key in {self.root} nor a folder holding an export")
        return entry
