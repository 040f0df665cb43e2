"""Tokenize a corpus once into uint16 memmaps, cached by content hash (docs/method.md §3).

A cache entry is a directory `<cache_dir>/<source>-<key>/` holding `tokenizer.json`, `train.bin`, `val.bin`
and `meta.json` (tokenizer hash, corpus hash, token and byte counts, sources, interpreter version). The key
hashes the corpus content and every setting that shapes the tokens, so a second run finds it in seconds.
An entry is built in a temporary directory and renamed into place: a crash never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from sparse_lm.config import DataConfig, Source, check_ranges
from sparse_lm.data import sources
from sparse_lm.data.tokenizer import EOT, TIKTOKEN_DIR, saved_hash, train_tokenizer
from sparse_lm.errors import UserError
from sparse_lm.fsutil import atomic_directory, write_json

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class CacheError(UserError):
    pass


@dataclass
class TokenData:
    dir: Path
    meta: dict
    train: np.memmap
    val: np.memmap

    @property
    def tokenizer_path(self) -> Path:
        """The trained tokenizer's file (an entry made with a given tiktoken tokenizer keeps it in tiktoken/ instead)."""
        return self.dir / "tokenizer.json"

    @property
    def val_bytes_per_token(self) -> float:
        return self.meta["val"]["bytes"] / max(1, self.meta["val"]["tokens"])


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_LM_CACHE", "~/.cache/sparse_lm")).expanduser()


def prepare(cfg: DataConfig, tokenizer=None) -> TokenData:
    """Return the tokenized corpus for `cfg`, building and caching it on first use.

    With `tokenizer` (e.g. a converted reference model's), the corpus is encoded with it instead of a BPE trained
    on it; its hash is part of the cache key."""
    check_ranges(cfg, "data.")  # e.g. vocab_size ≤ 65536 for the uint16 cache; ranges live in the schema
    local = sources.list_local(cfg) if cfg.source != Source.hf else None
    corpus_hash = sources.local_fingerprint(local) if local else sources.hf_fingerprint(cfg)
    settings = {"v": FORMAT_VERSION, "vocab": cfg.vocab_size, "val": cfg.val_fraction, "tok_bytes": cfg.tokenizer_sample_bytes}
    if tokenizer is not None:
        settings["tokenizer"] = tokenizer_key(tokenizer)
    key = hashlib.sha256((corpus_hash + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    entry = root / f"{cfg.source.value}-{key}"
    if entry.is_dir():
        log.info(f"data: using cached tokens in {entry}")
        return load(entry)

    def documents() -> Iterator[tuple[str, str]]:
        return sources.read_local(local) if local else sources.read_hf(cfg)

    with atomic_directory(entry) as tmp:
        meta = build(tmp, documents, cfg, tokenizer)
        meta.update(corpus_hash=corpus_hash, source=describe(cfg, local))
        if local and local.skipped:
            meta["skipped_not_utf8"] = sorted(set(local.skipped))
            log.info(f"data: skipped {len(meta['skipped_not_utf8'])} files that are not UTF-8")
        write_json(tmp / "meta.json", meta)
    log.info(f"data: cached in {entry}")
    return load(entry)


def tokenizer_key(tok) -> str:
    """A given tokenizer's identity: the tiktoken adapter's hash, or the hash of a `tokenizers.Tokenizer`'s JSON."""
    return getattr(tok, "hash", None) or hashlib.sha256(tok.to_str().encode()).hexdigest()


def save_tokenizer(tok, out: Path) -> None:
    """Write a given tokenizer into a cache entry: tiktoken/ for the tiktoken adapter, else tokenizer.json."""
    if hasattr(tok, "hash"):
        tok.save(out / TIKTOKEN_DIR)
    else:
        tok.save(str(out / "tokenizer.json"))


def trained_tokenizer(out: Path, documents: Callable[[], Iterable[tuple[str, str]]], cfg: DataConfig, t0: float):
    """Pass 1: train the tokenizer on (at most tokenizer_sample_bytes of) the training documents."""
    sample, n = [], 0
    for key, text in documents():
        if not sources.is_val(key, cfg.val_fraction):
            sample.append(text)
            n += len(text.encode())
            if n >= cfg.tokenizer_sample_bytes:
                break
    if not sample:
        raise UserError(f"data: the corpus ({cfg.source.value}) has no training documents")
    tok = train_tokenizer(sample, cfg.vocab_size)
    del sample
    tok.save(str(out / "tokenizer.json"))
    log.info(f"data: trained a {tok.get_vocab_size()}-token BPE on {n / 1e6:.1f} MB in {time.time() - t0:.1f}s")
    return tok


def build(out: Path, documents: Callable[[], Iterable[tuple[str, str]]], cfg: DataConfig, tok=None) -> dict:
    t0 = time.time()
    if tok is not None:
        save_tokenizer(tok, out)
    else:
        tok = trained_tokenizer(out, documents, cfg, t0)
    tokenizer_hash = saved_hash(out)  # what load() checks the entry against

    # Pass 2: encode every document, <|endoftext|> after each, appending to train.bin / val.bin.
    eot = tok.token_to_id(EOT)
    stats = {split: {"tokens": 0, "bytes": 0, "docs": 0} for split in ("train", "val")}
    files = {split: open(out / f"{split}.bin", "wb") for split in stats}
    t1, batch = time.time(), []

    def flush() -> None:
        for (split, text), enc in zip(batch, tok.encode_batch([t for _, t in batch])):
            ids = np.asarray(enc.ids + [eot], dtype=np.uint16)
            files[split].write(ids.tobytes())
            s = stats[split]
            s["tokens"] += len(ids)
            s["bytes"] += len(text.encode())
            s["docs"] += 1
        batch.clear()
        done = stats["train"]["bytes"] + stats["val"]["bytes"]
        log.info(f"data: tokenized {done / 1e6:.1f} MB ({done / 1e6 / (time.time() - t1 + 1e-9):.1f} MB/s)")

    try:
        size = 0
        for key, text in documents():
            batch.append(("val" if sources.is_val(key, cfg.val_fraction) else "train", text))
            size += len(text)
            if size >= 8_000_000:
                flush()
                size = 0
        if batch:
            flush()
    finally:
        for f in files.values():
            f.close()
    for split, s in stats.items():
        if s["tokens"] == 0 and (split == "train" or cfg.val_fraction > 0):
            raise UserError(f"data: the {split} split is empty; the corpus is too small for data.val_fraction={cfg.val_fraction}")
    log.info(f"data: {stats['train']['tokens']:,} train / {stats['val']['tokens']:,} val tokens in {time.time() - t0:.1f}s")
    return {
        "format": FORMAT_VERSION,
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_hash": tokenizer_hash,
        "train": stats["train"],
        "val": stats["val"],
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def describe(cfg: DataConfig, local: sources.LocalCorpus | None) -> dict:
    if local:
        return {"type": cfg.source.value, "root": str(local.root), "files": len(local.files), "exclude": list(cfg.exclude)}
    return {"type": "hf", "name": cfg.hf_name, "config": cfg.hf_config, "data_files": cfg.hf_data_files, "split": cfg.hf_split}


def load(entry: Path) -> TokenData:
    """Open a cache entry, refusing one whose files do not match its meta.json."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        raise CacheError(f"{entry}: no meta.json; this is not a complete sparse_lm token cache. Delete the directory.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{meta_path}: not valid JSON ({e}); the cache entry is damaged. Delete {entry} to rebuild it.") from None
    actual = saved_hash(entry)
    if actual != meta["tokenizer_hash"]:
        raise CacheError(
            f"{entry / (TIKTOKEN_DIR if (entry / TIKTOKEN_DIR).is_dir() else 'tokenizer.json')}: tokenizer hash {actual[:12]} does not match the {meta['tokenizer_hash'][:12]} "
            f"the tokens were made with (meta.json). Delete {entry} to rebuild it."
        )
    arrays = {}
    for split in ("train", "val"):
        path = entry / f"{split}.bin"
        expected = meta[split]["tokens"] * 2
        if not path.is_file() or path.stat().st_size != expected:
            raise CacheError(f"{path}: expected {expected} bytes ({meta[split]['tokens']} tokens). Delete {entry} to rebuild it.")
        arrays[split] = np.memmap(path, dtype=np.uint16, mode="r") if expected else np.zeros(0, np.uint16)
    return TokenData(entry, meta, arrays["train"], arrays["val"])
