"""Convert between the paper's released checkpoint format and ours.

    python -m sparse_lm.convert from_reference <reference dir> <out> [--tokenizer DIR]
    python -m sparse_lm.convert to_reference <run dir or checkpoint> <out dir>

`from_reference` writes a checkpoint directory every tool takes (`sample`, `inspect`, `prune`): model.pt, config.yaml,
state.json (where it came from, the densities found in its weights) and the tokenizer. The tokenizer is the
tinypython_2k pair encoder.json + vocab.bpe, taken from --tokenizer, else from the model directory or its
`tokenizer/`, else from $TINYPYTHON_TOK_DIR; a directory exported by `to_reference` carries our tokenizer.json
instead, which is used as it is. `to_reference` writes beeg_config.json and final_model.pt (weights only, as the
reference loader reads them) and the model's tokenizer beside them (tokenizer.json, or tokenizer/ for a converted
one). Every tool also accepts a reference directory directly: it is converted once into $SPARSE_LM_CACHE/converted/ (`checkpoint.resolve`). The mapping is in sparse_lm/reference.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from sparse_lm import checkpoint, reference
from sparse_lm.config import Config, DataConfig, SparsityConfig, TrainConfig, to_yaml
from sparse_lm.data.tiktoken_tokenizer import FILES as TIKTOKEN_FILES
from sparse_lm.data.tiktoken_tokenizer import TiktokenTokenizer, is_tiktoken_dir
from sparse_lm.data.tokenizer import TIKTOKEN_DIR, load_tokenizer, saved_hash
from sparse_lm.errors import UserError, reported
from sparse_lm.fsutil import atomic_directory, write_json, write_text
from sparse_lm.roles import nonzeros_by_kind

CONVERT_VERSION = 1  # part of the cache key of converted models: a change to the mapping converts them again


def find_tokenizer(src: Path, given: str | None) -> Path:
    """The model's tokenizer: tinypython_2k (a directory holding encoder.json + vocab.bpe) or a tokenizer.json of ours.
    Looked for in `given`, else beside the model (src, src/tokenizer, src/tokenizer.json), else $TINYPYTHON_TOK_DIR."""
    if given:
        if is_tiktoken_dir(Path(given)) or Path(given).name == "tokenizer.json" and Path(given).is_file():
            return Path(given)
        raise UserError(f"--tokenizer {given}: neither a directory holding {' and '.join(TIKTOKEN_FILES)} nor a tokenizer.json")
    beside = next((c for c in (src, src / "tokenizer") if is_tiktoken_dir(c)), None) or \
        (src / "tokenizer.json" if (src / "tokenizer.json").is_file() else None)
    env = os.environ.get("TINYPYTHON_TOK_DIR")
    found = beside or (Path(env) if env and is_tiktoken_dir(Path(env)) else None)
    if found is None:
        raise UserError(f"{src}: no tokenizer found for this model (tinypython_2k: {' and '.join(TIKTOKEN_FILES)}): put them in "
                        f"{src / 'tokenizer'}, or set TINYPYTHON_TOK_DIR (python -m sparse_lm.convert also takes --tokenizer DIR)")
    return found


def open_tokenizer(path: Path):
    return load_tokenizer(path) if path.name == "tokenizer.json" else TiktokenTokenizer(path)


def from_reference(src: str | Path, out: str | Path, tokenizer: str | None = None, replace: bool = False) -> Path:
    src, out = Path(src), Path(out)
    if out.exists() and not replace:
        raise UserError(f"{out} exists; choose another output directory")
    ref, sd = reference.read(src)
    mcfg = reference.model_config(ref, sd)
    weights = reference.import_weights(ref, sd, mcfg)
    tok_path = find_tokenizer(src, tokenizer)
    tok = open_tokenizer(tok_path)
    if tok.get_vocab_size() != mcfg.vocab_size:
        raise UserError(f"{tok_path}: a {tok.get_vocab_size()}-token tokenizer for a model of vocab_size={mcfg.vocab_size}")
    found = {kind: nz / n for kind, (nz, n) in nonzeros_by_kind(weights).items()}
    hidden = found.get("hidden", 1.0)
    cfg = Config(name=src.name, model=mcfg, data=DataConfig(vocab_size=mcfg.vocab_size),
                 sparsity=SparsityConfig(enabled=hidden < 1.0, hidden_density=hidden, embed_density=found.get("embed", 1.0)),
                 train=TrainConfig(max_steps=1))
    with atomic_directory(out) as tmp:
        torch.save(weights, tmp / "model.pt")
        write_text(tmp / "config.yaml", to_yaml(cfg))
        if isinstance(tok, TiktokenTokenizer):
            tok.save(tmp / TIKTOKEN_DIR)
        else:
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
        write_json(tmp / "state.json", {"step": 0, "converted_from": {"format": "reference", "dir": str(src.resolve()),
                                                                       "config": ref, "densities": found, "tokenizer": str(tok_path)},
                                        "tokenizer_hash": saved_hash(tmp)})
    return out


def cached_conversion(src: Path) -> Path:
    """A reference directory converted once into the cache, for tools given the directory. The key covers the model
    files, the tokenizer found for it and the converter's version."""
    from sparse_lm.data.cache import default_cache_dir, tokenizer_key

    key = hashlib.sha256(f"v{CONVERT_VERSION};{tokenizer_key(open_tokenizer(find_tokenizer(src, None)))};".encode())
    for name in (reference.CONFIG_FILE, reference.WEIGHTS_FILE):
        st = (src / name).stat()
        key.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    key.update((src / reference.CONFIG_FILE).read_bytes())
    out = default_cache_dir() / "converted" / f"{src.resolve().name}-{key.hexdigest()[:16]}"
    if not (out / "model.pt").is_file():
        from_reference(src, out, replace=True)
        print(f"converted {src} into {out}", file=sys.stderr)
    return out


HUB = "hf:"  # `hf:<owner>/<repo>[/<folder>]`: a reference model on the Hugging Face Hub


def hub_snapshot(spec: str) -> Path:
    """The local snapshot of `hf:<owner>/<repo>[/<folder>]` (downloaded once into the Hugging Face cache, then reused
    offline), as a directory holding the model."""
    parts = spec[len(HUB):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"{spec}: a Hub model is hf:<owner>/<repo>[/<folder>]")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download

    patterns = [f"{folder}/*" if folder else "*"]
    try:
        local = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
        if not reference.is_reference_dir(local / folder):
            raise FileNotFoundError(folder)  # a snapshot cached for other files of the repo
    except Exception:  # not cached yet
        try:
            local = Path(snapshot_download(repo, allow_patterns=patterns))
        except Exception as e:
            raise UserError(f"{spec}: not in the local Hugging Face cache and not downloadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}). Without a network, download the model elsewhere and give "
                            f"its directory instead") from None
    model = local / folder
    if not reference.is_reference_dir(model):
        raise UserError(f"{spec}: {model} holds no {reference.CONFIG_FILE} (the Hub repo is not in the reference checkpoint format)")
    return model


def to_reference(path: str | Path, out: str | Path) -> Path:
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    weights = checkpoint.load_weights(ckpt)
    ref, sd = reference.export(cfg.model, weights, cfg.sparsity.hidden_density if cfg.sparsity.enabled else None)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists; choose another output directory")
    with atomic_directory(out) as tmp:
        write_text(tmp / reference.CONFIG_FILE, json.dumps(ref, indent=2))
        torch.save(sd, tmp / reference.WEIGHTS_FILE)
        if (ckpt / TIKTOKEN_DIR).is_dir():  # the tokenizer it came with, beside it
            shutil.copytree(ckpt / TIKTOKEN_DIR, tmp / "tokenizer")
        else:
            shutil.copyfile(ckpt / "tokenizer.json", tmp / "tokenizer.json")
    return out


@reported
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_lm.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from_reference", help="a released model directory (beeg_config.json, final_model.pt) -> our checkpoint")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--tokenizer", help="directory of the tinypython_2k encoder.json and vocab.bpe")
    b = sub.add_parser("to_reference", help="our run or checkpoint -> beeg_config.json and final_model.pt")
    b.add_argument("src")
    b.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "from_reference":
        print(f"wrote {from_reference(args.src, args.out, args.tokenizer)}")
    else:
        print(f"wrote {to_reference(args.src, args.out)}")


if __name__ == "__main__":
    main()
