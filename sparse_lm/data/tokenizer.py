"""Byte-level BPE with one special `<|endoftext|>` token between documents (docs/method.md §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
TIKTOKEN_DIR = "tiktoken"  # where a checkpoint or cache entry keeps a tiktoken tokenizer (tinypython_2k), else tokenizer.json

# GPT-4's split pattern (cl100k): digits in groups of up to three, case-insensitive contractions, runs of
# punctuation kept together. It gave ~7.5% fewer tokens on code than GPT-2's pattern.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_from(directory: str | Path):
    """The tokenizer a checkpoint or a cache entry keeps: tiktoken/ (a converted reference model's) or tokenizer.json."""
    if (Path(directory) / TIKTOKEN_DIR).is_dir():
        from sparse_lm.data.tiktoken_tokenizer import TiktokenTokenizer

        return TiktokenTokenizer(Path(directory) / TIKTOKEN_DIR)
    return load_tokenizer(Path(directory) / "tokenizer.json")


def saved_hash(directory: str | Path) -> str:
    """The identity of the tokenizer kept in `directory`, as meta.json and state.json record it."""
    if (Path(directory) / TIKTOKEN_DIR).is_dir():
        return load_from(directory).hash
    return file_hash(Path(directory) / "tokenizer.json")
