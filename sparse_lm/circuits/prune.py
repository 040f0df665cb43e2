"""`python -m sparse_lm.prune`: a checkpoint's circuits for a list of tasks, with the battery asked for.

    run(cfg)  → checks the output directory, loads the model, computes (`prune_all`), writes (`report`), publishes

Results are written aside and moved into the output directory only once complete, so a failure leaves an earlier
invocation's files intact, and an earlier invocation's results are never replaced without `overwrite=true`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from sparse_lm import checkpoint
from sparse_lm.circuits import report
from sparse_lm.circuits.battery import Subject, TaskResult, controls_asked, run_task
from sparse_lm.circuits.controls import random_init_model, redrawn_model
from sparse_lm.circuits.nodes import NodeSpace
from sparse_lm.circuits.pruning import site_stats
from sparse_lm.circuits.tasks import TASKS, TaskTokenError, build
from sparse_lm.cli import load_model
from sparse_lm.config import DataConfig, PruneConfig, Source
from sparse_lm.errors import UserError
from sparse_lm.fsutil import atomic_file, write_json
from sparse_lm.model import GPT


@dataclass
class Results:
    checkpoint: str
    step: int
    tasks: list[TaskResult] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)  # task -> why this tokenizer cannot pose it
    seconds: float = 0.0
    # For the pages' node panels: the trained model's site statistics, the pretraining tokens they index, a decoder.
    stats: dict = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    decode: Callable[[int], str] = str
    means_from: dict = field(default_factory=dict)  # the data the ablation means were taken over


def task_list(spec) -> list[str]:
    names = list(TASKS) if spec == "all" else ([spec] if isinstance(spec, str) else list(spec))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"tasks: unknown {unknown}; choose all or from {list(TASKS)}")
    return names


def pretraining_tokens(mcfg, n: int, cfg: PruneConfig, tokenizer=None) -> tuple[torch.Tensor, dict]:
    """The first n training sequences [n, ctx_len] the ablation means, resampling and top activations come from, and
    where they came from. By default the checkpoint's own data; `means_data=<dir>` takes another corpus. A model
    converted from the reference format has no data of its own (the paper's was not released): its tokens come
    from the embedded corpus (or means_data), encoded with the model's own tokenizer."""
    from sparse_lm.data.cache import prepare

    data_cfg = mcfg.data if cfg.means_data is None else DataConfig(source=Source.dir, path=cfg.means_data, vocab_size=mcfg.data.vocab_size)
    data = prepare(data_cfg, tokenizer)
    T = mcfg.model.ctx_len
    n = min(n, (len(data.train) - 1) // T)
    if n == 0:
        raise UserError(f"{data_cfg.path or data_cfg.source.value}: fewer than {T + 1} training tokens, not one sequence of "
                        f"model.ctx_len={T} to take the ablation means over")
    tokens = torch.from_numpy(np.asarray(data.train[: n * T], dtype=np.int64)).view(n, T)
    return tokens, {"source": data.meta["source"], "cache": str(data.dir), "sequences": n,
                    "tokenizer": "the model's own" if tokenizer is not None else "the data's"}


def cached_stats(model: GPT, tokens: torch.Tensor, path: Path | None) -> dict:
    """Site means and top-activating positions over `tokens` (pruning.site_stats), cached at `path` (beside the
    checkpoint) when given."""
    if path is not None and path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    stats = site_stats(model, NodeSpace.of(model).sites, tokens)
    if path is not None:
        with atomic_file(path) as tmp:  # a crash never leaves a half-written cache
            torch.save(stats, tmp)
    return stats


def subject(label: str, model: GPT, tokens: torch.Tensor, stats: dict | None = None) -> Subject:
    return Subject(label, model, (stats or cached_stats(model, tokens, None))["means"], tokens)


def trained_stats(model: GPT, tokenizer, mcfg, state: dict, ckpt: Path, cfg: PruneConfig) -> tuple[torch.Tensor, dict, dict]:
    """(pretraining tokens, site statistics cached beside the checkpoint, where the tokens came from), as `cfg`
    (mean_sequences, means_data) asks."""
    converted = "converted_from" in state  # sparse_lm.convert: no pretraining data of its own
    tokens, means_from = pretraining_tokens(mcfg, cfg.mean_sequences, cfg, tokenizer if converted or cfg.means_data else None)
    # Statistics over other data than the checkpoint's own are named after that data's cache entry (corpus,
    # tokenizer and settings): an edited corpus or another interpreter's stdlib gets statistics of its own.
    other = "" if not (converted or cfg.means_data) else "-" + Path(means_from["cache"]).name
    return tokens, cached_stats(model, tokens, ckpt / f"site_stats-{cfg.mean_sequences}{other}.pt"), means_from


def prune_all(model: GPT, tokenizer, mcfg, state: dict, ckpt: Path, tasks: list[str], cfg: PruneConfig, log=print) -> Results:
    """Every task's circuit and battery on the checkpoint's model (typed results; nothing written)."""
    t0 = time.time()
    asked = controls_asked(cfg)
    tokens, stats, means_from = trained_stats(model, tokenizer, mcfg, state, ckpt, cfg)
    trained = subject("trained model", model, tokens, stats)
    controls = {}
    if "random_init" in asked:
        controls["random_init"] = subject("random_init", random_init_model(mcfg, state["step"], cfg.seed, cfg.device), tokens)
    if "redrawn" in asked:
        controls["redrawn"] = subject("redrawn", redrawn_model(model, cfg.seed), tokens)
    decode = lambda t: tokenizer.decode([t])  # noqa: E731
    results = Results(str(ckpt), state["step"], stats=stats, tokens=tokens, decode=decode, means_from=means_from)
    for i, task in enumerate(tasks, 1):
        log(f"[{i}/{len(tasks)}] {task}")
        try:
            fits = mcfg.model.ctx_len
            train = build(task, tokenizer, "train", cfg.n_train, cfg.seed, max_len=fits)
            test = build(task, tokenizer, "test", 2 * cfg.n_test, cfg.seed, max_len=fits)  # bisection, then sufficiency
            unseen = build(task, tokenizer, "unseen", cfg.n_test, cfg.seed, max_len=fits)
            for split in (test, unseen):
                if split.answers != train.answers:
                    raise TaskTokenError(f"{task}: the splits tokenize the answers differently "
                                         f"({train.answer_text} vs {split.answer_text})")
        except TaskTokenError as e:
            log(f"  skipped: {e}")
            results.unusable[task] = str(e)
            continue
        res = run_task(trained, controls, train, test, unseen, cfg, token_text=decode, log=log)
        log("  " + report.task_line(res, cfg))
        results.tasks.append(res)
    results.seconds = round(time.time() - t0, 1)
    return results


def output_dir(cfg: PruneConfig, ckpt: Path) -> Path:
    return Path(cfg.out_dir) if cfg.out_dir else checkpoint.results_dir(ckpt, "circuits")


def run(cfg: PruneConfig) -> Results:
    torch.manual_seed(cfg.seed)
    tasks = task_list(cfg.tasks)
    controls_asked(cfg)
    ckpt = checkpoint.resolve(cfg.checkpoint)
    out = output_dir(cfg, ckpt)
    earlier = report.earlier_results(out)
    if earlier and not cfg.overwrite:  # refused before any work
        shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise UserError(f"out_dir {out} already holds the results of an earlier prune ({shown}); keep them by choosing another "
                        f"out_dir=..., or replace them with overwrite=true")
    model, tokenizer, mcfg, state = load_model(ckpt, cfg.device)
    model.requires_grad_(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        results = prune_all(model, tokenizer, mcfg, state, ckpt, tasks, cfg)
        report.write(results, model, cfg, staging)
        write_json(staging / "run.json", {"checkpoint": results.checkpoint, "step": results.step, "seconds": results.seconds,
                                          "files": report.files_under(staging) + ["run.json"],
                                          "config": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)})
        report.publish(staging, out, earlier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} in {results.seconds:.0f}s")
    return results
