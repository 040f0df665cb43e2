"""Where training text comes from (docs/method.md §3): the stdlib, a directory of .py files, or a Hugging Face dataset.

A source yields `(key, text)` documents. The key (a relative path where there is one) decides the train/val
split by hash, so the split is by file, stable when files are added, and independent of reading order.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sparse_lm.config import DataConfig, Source
from sparse_lm.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class LocalCorpus:
    """A directory's matching .py files, read once; non-UTF-8 files are skipped (a few stdlib files are)."""

    root: Path
    files: list[str]  # relative paths, sorted
    skipped: list[str] = field(default_factory=list)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def list_local(cfg: DataConfig) -> LocalCorpus:
    if cfg.source == Source.stdlib:
        root = stdlib_root()
    else:
        if not cfg.path:
            raise UserError("data.path is required for data.source=dir (a directory of .py files)")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise UserError(f"data.path={cfg.path}: no such directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if reldir == "." else reldir + "/"
        # Prune excluded directories (e.g. site-packages) instead of walking them.
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not _excluded(f"{prefix}{d}/", cfg.exclude))
        files += [prefix + f for f in filenames if fnmatch.fnmatch(prefix + f, cfg.include) and not _excluded(prefix + f, cfg.exclude)]
    files.sort()
    if cfg.max_docs is not None:
        files = files[: cfg.max_docs]
    if not files:
        raise UserError(f"no files match data.include={cfg.include!r} under {root} (after data.exclude={cfg.exclude})")
    return LocalCorpus(root, files)


def read_local(corpus: LocalCorpus) -> Iterator[tuple[str, str]]:
    for rel in corpus.files:
        try:
            text = (corpus.root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            corpus.skipped.append(rel)
            continue
        if text.strip():
            yield rel, text


def local_fingerprint(corpus: LocalCorpus) -> str:
    """Content hash of the corpus: any edit, addition or removal of a file changes it."""
    h = hashlib.sha256()
    for rel in corpus.files:
        h.update(rel.encode() + b"\0" + hashlib.sha256((corpus.root / rel).read_bytes()).digest())
    return h.hexdigest()


def hf_fingerprint(cfg: DataConfig) -> str:
    """An HF dataset is identified by its coordinates (streaming it to hash the content would cost a full pass)."""
    keys = ("hf_name", "hf_config", "hf_data_files", "hf_split", "hf_text_column", "hf_path_column", "max_docs", "max_bytes")
    return hashlib.sha256(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True).encode()).hexdigest()


def read_hf(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    import datasets  # imported lazily: slow to import and unneeded for local sources

    if not cfg.hf_name:
        raise UserError("data.hf_name is required for data.source=hf (e.g. codeparrot/codeparrot-clean, or json)")
    ds = datasets.load_dataset(
        cfg.hf_name, cfg.hf_config, data_files=cfg.hf_data_files, split=cfg.hf_split, streaming=cfg.hf_streaming
    )
    columns = ds.column_names or []
    if columns and cfg.hf_text_column not in columns:
        raise UserError(f"data.hf_text_column={cfg.hf_text_column!r} is not a column of {cfg.hf_name}: {columns}")
    n_bytes = 0
    for i, row in enumerate(ds):
        if cfg.max_docs is not None and i >= cfg.max_docs:
            break
        text = row[cfg.hf_text_column]
        if not text or not text.strip():
            continue
        key = str(row.get(cfg.hf_path_column) or "") if cfg.hf_path_column else ""
        # Without a path the text itself decides the split (still independent of order).
        yield key or hashlib.sha1(text.encode()).hexdigest(), text
        n_bytes += len(text.encode())
        if cfg.max_bytes is not None and n_bytes >= cfg.max_bytes:
            break


def is_val(key: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction
