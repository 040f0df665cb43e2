import json
import time

import numpy as np
import pytest

from sparse_lm.errors import UserError
from sparse_lm.config import DataConfig, Source
from sparse_lm.data import cache as cache_mod
from sparse_lm.data.cache import CacheError, prepare
from sparse_lm.data.loader import ChunkSampler, train_batch, val_batches
from sparse_lm.data.sources import is_val, list_local, read_local
from sparse_lm.data.tokenizer import load_tokenizer


def dir_cfg(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(source=Source.dir, path=str(path), exclude=[], vocab_size=400, cache_dir=str(tmp_path / "cache"), **kw)


def test_stdlib_listing_skips_site_packages_and_tests():
    corpus = list_local(DataConfig())
    assert len(corpus.files) > 300
    assert not any("site-packages" in f or f.startswith("test/") or "/tests/" in f for f in corpus.files)
    assert "json/decoder.py" in corpus.files and "os.py" in corpus.files


def test_dir_source_globs_excludes_and_skips_non_utf8(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "c.py").write_text("z = 3\n")
    (tmp_path / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("not python")
    cfg = DataConfig(source=Source.dir, path=str(tmp_path), exclude=["skip/*"])
    corpus = list_local(cfg)
    assert corpus.files == ["a.py", "latin1.py", "sub/b.py"]
    assert [k for k, _ in read_local(corpus)] == ["a.py", "sub/b.py"] and corpus.skipped == ["latin1.py"]


def test_missing_or_empty_corpus_errors_name_the_setting(tmp_path):
    with pytest.raises(UserError, match="data.path=.*no such directory"):
        prepare(dir_cfg(tmp_path / "nope", tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files match data.include"):
        prepare(dir_cfg(tmp_path / "empty", tmp_path))
    with pytest.raises(ValueError, match="data.path is required"):
        prepare(DataConfig(source=Source.dir))


def test_split_is_by_file_and_deterministic():
    keys = [f"pkg/mod{i}.py" for i in range(4000)]
    val = [k for k in keys if is_val(k, 0.1)]
    assert val == [k for k in keys if is_val(k, 0.1)]
    assert 0.08 < len(val) / len(keys) < 0.12


def test_prepare_builds_a_cache_that_round_trips_and_is_reused(corpus, tmp_path, monkeypatch):
    cfg = dir_cfg(corpus, tmp_path)
    data = prepare(cfg)
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["train"]["tokens"] == len(data.train) > 10_000 and meta["val"]["tokens"] == len(data.val) > 0
    assert meta["vocab_size"] == 400 and meta["source"]["files"] == 121
    tok = load_tokenizer(data.tokenizer_path)
    eot = tok.token_to_id("<|endoftext|>")
    first_doc = np.asarray(data.train[: int(np.argmax(np.asarray(data.train) == eot))])
    val_files = [f for f in sorted(p.name for p in corpus.glob("*.py")) if is_val(f, cfg.val_fraction)]
    train_files = [f for f in sorted(p.name for p in corpus.glob("*.py")) if not is_val(f, cfg.val_fraction)]
    assert val_files and tok.decode(first_doc.tolist()) == (corpus / train_files[0]).read_text()

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(cache_mod, "train_tokenizer", no_training)
    t0 = time.time()
    again = prepare(cfg)
    assert again.dir == data.dir and time.time() - t0 < 2.0
    (corpus / "pkg" / "mod.py").write_text("def f(x):\n    return x + 2\n")  # any edit changes the key
    try:
        with pytest.raises(AssertionError, match="trained again"):
            prepare(cfg)
    finally:
        (corpus / "pkg" / "mod.py").write_text("def f(x):\n    return x + 1\n")


def test_cache_refuses_a_mismatched_tokenizer_or_a_truncated_file(corpus, tmp_path):
    data = prepare(dir_cfg(corpus, tmp_path))
    tok_file = data.tokenizer_path
    original = tok_file.read_text()
    tok_file.write_text(original.replace('"<|endoftext|>"', '"<|end|>"', 1))
    with pytest.raises(CacheError, match=r"tokenizer\.json: tokenizer hash .* does not match"):
        prepare(dir_cfg(corpus, tmp_path))
    tok_file.write_text(original)
    with open(data.dir / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CacheError, match=r"val\.bin: expected"):
        prepare(dir_cfg(corpus, tmp_path))


def test_a_failed_build_leaves_no_cache_entry(corpus, tmp_path, monkeypatch):
    cfg = dir_cfg(corpus, tmp_path)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod.np, "asarray", crash)  # dies in the middle of encoding
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert len(prepare(cfg).train) > 0


def test_hugging_face_source_through_datasets_on_a_local_file(corpus, tmp_path):
    rows = [{"path": f"repo/{p.name}", "content": p.read_text()} for p in sorted(corpus.glob("*.py"))[:40]]
    jsonl = tmp_path / "code.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=Source.hf, hf_name="json", hf_data_files=str(jsonl), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    data = prepare(cfg)
    assert data.meta["source"]["name"] == "json" and data.meta["train"]["docs"] + data.meta["val"]["docs"] == 40
    assert data.meta["val"]["docs"] == sum(is_val(r["path"], 0.2) for r in rows)
    cfg.hf_text_column = "text"
    with pytest.raises(ValueError, match=r"data.hf_text_column='text' is not a column .*\['path', 'content'\]"):
        prepare(cfg)


def test_batches_are_a_pure_function_of_step_and_ranks_read_disjoint_rows():
    tokens = np.arange(10_001, dtype=np.uint16)
    s = ChunkSampler(tokens, ctx_len=10, seed=3)
    x, y = train_batch(s, step=7, micro=1, rank=0, world=1, micro_bs=4, accum=2)
    x2, _ = train_batch(ChunkSampler(tokens, 10, 3), step=7, micro=1, rank=0, world=1, micro_bs=4, accum=2)
    assert torch_equal(x, x2) and torch_equal(y[:, :-1], x[:, 1:])
    rows = {tuple(train_batch(s, 7, m, r, 2, 4, 2)[0][i].tolist()) for m in range(2) for r in range(2) for i in range(4)}
    assert len(rows) == 16
    starts = {int(train_batch(s, step, 0, 0, 1, 10, 1)[0][i, 0]) for step in range(100) for i in range(10)}
    assert starts == set(range(0, 10_000, 10))  # one epoch visits every chunk exactly once


def test_validation_batches_are_fixed_and_split_across_ranks():
    tokens = np.arange(5_001, dtype=np.uint16)
    full = [x for x, _ in val_batches(tokens, 10, n_sequences=12, micro_bs=4)]
    halves = [x for r in range(2) for x, _ in val_batches(tokens, 10, 12, 4, rank=r, world=2)]
    other = [x for x, _ in val_batches(tokens, 10, 12, 5)]  # another micro-batch size: the same sequences
    assert sum(len(x) for x in full) == 12 == sum(len(x) for x in halves) == sum(len(x) for x in other)
    starts = sorted(int(x[i, 0]) for x in full for i in range(len(x)))
    assert starts == sorted(int(x[i, 0]) for x in halves for i in range(len(x))) == sorted(int(x[i, 0]) for x in other for i in range(len(x)))


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
