"""The reference models' tokenizer, read by tiktoken, behind the interface the rest of sparse_lm uses.

The paper's released models use `tinypython_2k`: a GPT-2-format byte-level BPE (`encoder.json` + `vocab.bpe`, 2047
mergeable tokens) with its own split pattern and `<|endoftext|>` = 2047. tiktoken is needed for this tokenizer
only (`pip install -e ".[reference]"`). `TiktokenTokenizer` offers the part of `tokenizers.Tokenizer` that the data
cache, the tasks and the sampler call: `encode(text).ids`, `encode_batch`, `decode`, `id_to_token`, `token_to_id`,
`get_vocab_size`, and `save` (the two files, into a directory).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from sparse_lm.data.tokenizer import EOT
from sparse_lm.errors import UserError

FILES = ("encoder.json", "vocab.bpe")
# tinypython_2k's split pattern, as the reference defines it.
PATTERN = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass
class Encoding:
    ids: list[int]


def is_tiktoken_dir(path: Path) -> bool:
    return all((Path(path) / f).is_file() for f in FILES)


class TiktokenTokenizer:
    def __init__(self, directory: str | Path, name: str = "tinypython_2k"):
        try:
            import tiktoken
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        except ImportError:
            raise UserError('this tokenizer needs tiktoken: pip install -e ".[reference]"') from None
        self.dir = Path(directory)
        missing = [f for f in FILES if not (self.dir / f).is_file()]
        if missing:
            raise UserError(f"{self.dir}: not a tiktoken tokenizer directory (missing {', '.join(missing)}; expected the "
                            f"GPT-2-format pair encoder.json + vocab.bpe of tinypython_2k)")
        paths = {f: str(self.dir / f) for f in FILES}
        digests = {f: hashlib.sha256((self.dir / f).read_bytes()).hexdigest() for f in FILES}
        try:  # the digests make tiktoken's path-keyed cache reread a file that changed
            ranks = data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"], digests["vocab.bpe"], digests["encoder.json"])
        except (AssertionError, KeyError, ValueError) as e:
            raise UserError(f"{self.dir}: encoder.json and vocab.bpe do not describe one byte-level BPE ({type(e).__name__})") from None
        declared = json.loads((self.dir / "encoder.json").read_text()).get(EOT)
        self.eot = len(ranks) if declared is None else int(declared)  # tinypython_2k: 2047, right after the merges
        self.enc = tiktoken.Encoding(name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={EOT: self.eot})
        identity = [digests[f] for f in FILES] + [PATTERN, str(self.eot), name]  # what decides the ids a text gets
        self.hash = hashlib.sha256("\n".join(identity).encode()).hexdigest()

    def encode(self, text: str) -> Encoding:
        return Encoding(self.enc.encode(text, allowed_special="all"))

    def encode_batch(self, texts: list[str]) -> list[Encoding]:
        return [Encoding(ids) for ids in self.enc.encode_batch(texts, allowed_special="all")]

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(list(ids))

    def id_to_token(self, i: int) -> str:
        return EOT if i == self.eot else self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token == EOT:
            return self.eot
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            return None

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(self.dir / f, Path(directory) / f)

