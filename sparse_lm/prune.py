"""Prune a checkpoint to the smallest circuit for each task and count its edges (docs/method.md §5).

    python -m sparse_lm.prune checkpoint=runs/tiny tasks=all
    python -m sparse_lm.prune runs/tiny tasks=[bracket_counting,set_or_string] random_init=true

For every task: train node masks, bisect to the smallest circuit whose held-out loss per side is ≤ target, check
that removing it breaks the full model, count edges, and write <task>.json, <task>.png and <task>.html. Then a
summary table and the geometric mean of edge counts over the tasks the full model solves (summary.txt/json).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sparse_lm import checkpoint
from sparse_lm.circuits.draw import draw_html, draw_png
from sparse_lm.circuits.edges import circuit_edges, count_by_kind, describe
from sparse_lm.circuits.nodes import NodeSpace
from sparse_lm.circuits.pruning import evaluate, keep_top, site_means, smallest_passing, train_masks
from sparse_lm.cli import load_model, positional_checkpoint
from sparse_lm.config import EdgeConventions, PruneConfig, register_configs, to_object
from sparse_lm.errors import UserError, reported
from sparse_lm.fsutil import atomic_file, write_json
from sparse_lm.model import GPT
from sparse_lm.tasks import TASKS, TaskData, TaskTokenError, build


def find_circuit(model: GPT, means: dict, train: TaskData, test: TaskData, cfg: PruneConfig, log=print,
                 control: bool = False) -> dict:
    """Train masks on `train`, bisect on `test`; the result holds the circuit's nodes and losses.

    A trained model that fails a task whole gets no circuit. A `control` model (random init) is pruned anyway:
    whether masks can make it pass is what the control measures.
    """
    space = NodeSpace.of(model)
    calib = train.subset(cfg.n_calib)
    full = evaluate(model, space, means, torch.ones(space.total), calib, test)
    result = {"task": train.name, "answers": list(train.answer_text), "full": full, "solved": full["loss"] <= cfg.target,
              "total_nodes": space.total}
    if not result["solved"]:
        log(f"  the full model does not solve it (loss {full['loss']:.3f} > {cfg.target})" + ("" if control else ": no circuit"))
        if not control:
            return result

    def progress(step, loss, kept):
        if (step + 1) % max(1, cfg.steps // 4) == 0:
            log(f"  mask step {step + 1}/{cfg.steps}: task loss {loss:.3f}, {kept} nodes kept")

    tau = train_masks(model, space, means, train, cfg, progress)
    order = torch.argsort(tau, descending=True, stable=True)
    cache = {space.total: full}

    def loss_at(n: int) -> dict:
        if n not in cache:
            cache[n] = evaluate(model, space, means, keep_top(order, n, space.total), calib, test)
        return cache[n]

    n = smallest_passing(lambda k: loss_at(k)["loss"] <= cfg.target, space.total, hint=int((tau >= 0).sum()),
                         whole_passes=result["solved"])
    result["found"] = n is not None
    if n is None:
        log("  no circuit of at most the masks' size reaches the target")
        return result
    keep = keep_top(order, n, space.total)
    result.update(nodes=n, circuit=loss_at(n), kept=space.kept(keep), evaluations=len(cache))
    if cfg.check and result["solved"]:  # necessity: the full model without the circuit should fail the task
        result["without_circuit"] = evaluate(model, space, means, 1 - keep, calib, test)
        result["necessary"] = result["without_circuit"]["loss"] > cfg.target
    return result


def cached_means(model: GPT, ckpt: Path | None, mcfg, cfg: PruneConfig, space: NodeSpace) -> dict:
    """Site means over the first `mean_sequences` pretraining sequences, cached beside the checkpoint."""
    path = ckpt / f"site_means-{cfg.mean_sequences}.pt" if ckpt is not None else None
    if path is not None and path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    from sparse_lm.data.cache import prepare

    data = prepare(mcfg.data)
    T = mcfg.model.ctx_len
    n = min(cfg.mean_sequences, (len(data.train) - 1) // T)
    tokens = torch.from_numpy(np.asarray(data.train[: n * T], dtype=np.int64)).view(n, T)
    means = {site: m.cpu() for site, m in site_means(model, space.sites, tokens).items()}
    if path is not None:
        with atomic_file(path) as tmp:  # a crash never leaves a half-written cache
            torch.save(means, tmp)
    return means


def geometric_mean(values: list[int]) -> float | None:
    return math.exp(sum(math.log(max(v, 1)) for v in values) / len(values)) if values else None


def prune_model(model: GPT, tokenizer, means: dict, tasks: list[str], cfg: PruneConfig, out: Path, label: str,
                control: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    space = NodeSpace.of(model)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    rows, unusable = [], {}
    for i, task in enumerate(tasks, 1):
        t0 = time.time()
        print(f"[{label} {i}/{len(tasks)}] {task}", flush=True)
        try:
            train = build(task, tokenizer, "train", cfg.n_train, cfg.seed)
            test = build(task, tokenizer, "test", cfg.n_test, cfg.seed)
            if test.answers != train.answers:
                raise TaskTokenError(f"{task}: the train and test splits tokenize the answers differently "
                                     f"({train.answer_text} vs {test.answer_text})")
        except TaskTokenError as e:
            print(f"  skipped: {e}")
            unusable[task] = str(e)
            continue
        res = find_circuit(model, means, train, test, cfg, log=print, control=control)
        if res.get("found"):
            edges = circuit_edges(weights, model.cfg.n_layer, model.cfg.d_head, res["kept"], test.token_ids(), train.answers, cfg.edges,
                                  token_text=lambda t: tokenizer.decode([t]))
            res["edges"] = count_by_kind(edges)
            res["edge_list"] = [asdict(e) for e in edges]
            dims = dict(zip(space.sites, space.dims))
            title = f"{task}: {res['nodes']} nodes, {res['edges']['total']} edges ({label})"
            info = [("answers", " vs ".join(repr(a) for a in res["answers"])),
                    ("held-out loss per side", f"full model {res['full']['loss']:.3f}, circuit {res['circuit']['loss']:.3f} (target {cfg.target})"),
                    ("edges", ", ".join(f"{k} {v}" for k, v in res["edges"].items())), ("conventions", describe(cfg.edges))]
            if "without_circuit" in res:
                info.append(("full model without the circuit", f"loss {res['without_circuit']['loss']:.3f}"))
            draw_png(out / f"{task}.png", title, model.cfg.n_layer, dims, edges, res["kept"])
            draw_html(out / f"{task}.html", title, info, model.cfg.n_layer, dims, edges, res["kept"])
            print(f"  circuit: {res['nodes']} of {space.total} nodes, {res['edges']['total']} edges, "
                  f"loss {res['circuit']['loss']:.3f} (full model {res['full']['loss']:.3f})")
        res["seconds"] = round(time.time() - t0, 1)
        write_json(out / f"{task}.json", res)
        rows.append(res)
    # The score counts tasks the whole model solves; a control's circuits (if any) are scored on their own.
    scored = [r for r in rows if r.get("found") and (r["solved"] or control)]
    summary = {"label": label, "conventions": asdict(cfg.edges), "target": cfg.target,
               "geometric_mean_edges": geometric_mean([r["edges"]["total"] for r in scored]),
               "scored": [r["task"] for r in scored], "solved": [r["task"] for r in rows if r["solved"]],
               "failed_by_full_model": [r["task"] for r in rows if not r["solved"]],
               "unusable_with_tokenizer": unusable, "tasks": [{k: r.get(k) for k in ("task", "nodes", "seconds")} | {
                   "full_loss": r["full"]["loss"], "circuit_loss": r.get("circuit", {}).get("loss"),
                   "edges": r.get("edges", {}).get("total"), "without_circuit_loss": r.get("without_circuit", {}).get("loss"),
                   "necessary": r.get("necessary")} for r in rows]}
    write_json(out / "summary.json", summary)
    text = format_summary(summary)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"{s['label']}: target loss {s['target']} per side; edge conventions: {describe(EdgeConventions(**s['conventions']))}",
             f"{'task':<28} {'full loss':>9} {'circuit loss':>12} {'nodes':>6} {'edges':>7} {'loss without it':>15}  necessary"]

    def cell(v, fmt="{}"):
        return "-" if v is None else fmt.format(v)

    for r in s["tasks"]:
        necessary = "" if r["necessary"] is None else ("yes" if r["necessary"] else "NO")
        lines.append(f"{r['task']:<28} {r['full_loss']:>9.3f} {cell(r['circuit_loss'], '{:.3f}'):>12} {cell(r['nodes']):>6} "
                     f"{cell(r['edges']):>7} {cell(r.get('without_circuit_loss'), '{:.3f}'):>15}  {necessary}")
    gm = s["geometric_mean_edges"]
    lines.append(f"geometric mean of edges over {len(s['scored'])} task(s) with a circuit: {gm:.1f}" if gm else "no circuit: no score")
    if s["failed_by_full_model"]:
        lines.append(f"not solved by the full model: {', '.join(s['failed_by_full_model'])}")
    for task, why in s["unusable_with_tokenizer"].items():
        lines.append(f"unusable with this tokenizer: {task}: {why}")
    return "\n".join(lines)


def task_list(spec) -> list[str]:
    names = list(TASKS) if spec == "all" else ([spec] if isinstance(spec, str) else list(spec))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise UserError(f"tasks: unknown {unknown}; choose all or from {list(TASKS)}")
    return names


def earlier_results(out: Path) -> list[str]:
    """Files an earlier invocation wrote to `out` (relative paths): those its run.json lists, or, for results written
    before run.json listed them, its summary and per-task files. Anything else in `out` is not ours."""
    manifest = out / "run.json"
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text()).get("files")
        except json.JSONDecodeError:
            listed = None
        if listed is not None:
            return [f for f in listed if (out / f).is_file()]
    names = ["run.json", "summary.json", "summary.txt"] + [f"{t}.{ext}" for t in TASKS for ext in ("json", "png", "html")]
    return [f"{d}{n}" for d in ("", "random_init/") for n in names if (out / d / n).is_file()]


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def publish(staging: Path, out: Path, replaced: list[str]) -> None:
    """Move an invocation's finished files from `staging` into `out`, then drop the earlier files it replaces."""
    written = files_under(staging)
    for name in written:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out / name)
    for name in set(replaced) - set(written):
        (out / name).unlink(missing_ok=True)


def run(cfg: PruneConfig) -> dict:
    torch.manual_seed(cfg.seed)
    tasks = task_list(cfg.tasks)
    ckpt = checkpoint.resolve(cfg.checkpoint)
    in_run = ckpt.parent.name == "checkpoints"  # <run>/checkpoints/step-N, or a checkpoint directory on its own
    out = Path(cfg.out_dir) if cfg.out_dir else (ckpt.parent.parent / "circuits" / ckpt.name if in_run else ckpt / "circuits")
    earlier = earlier_results(out)
    if earlier and not cfg.overwrite:  # refused before any work
        shown = ", ".join(earlier[:3]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise UserError(f"out_dir {out} already holds the results of an earlier prune ({shown}); keep them by choosing another "
                        f"out_dir=..., or replace them with overwrite=true")
    model, tokenizer, mcfg, state = load_model(ckpt, cfg.device)
    model.requires_grad_(False)
    # Results are written aside and moved into out_dir only once complete: a failure leaves earlier ones intact.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = prune_all(model, tokenizer, mcfg, state, ckpt, tasks, cfg, staging)
        write_json(staging / "run.json", {**result, "files": files_under(staging) + ["run.json"],
                                          "config": OmegaConf.to_container(OmegaConf.structured(cfg))})
        publish(staging, out, earlier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} in {result['seconds']:.0f}s")
    return result


def prune_all(model: GPT, tokenizer, mcfg, state: dict, ckpt: Path, tasks: list[str], cfg: PruneConfig, out: Path) -> dict:
    """The trained model's circuits, and the random-init control's when asked, written under `out`."""
    t0 = time.time()
    space = NodeSpace.of(model)
    result = {"checkpoint": str(ckpt), "step": state["step"]}
    result["model"] = prune_model(model, tokenizer, cached_means(model, ckpt, mcfg, cfg, space), tasks, cfg, out, "trained model")
    if cfg.random_init:
        from sparse_lm.sparsity import Sparsifier

        torch.manual_seed(cfg.seed)
        random_model = GPT(mcfg.model).to(cfg.device).eval().requires_grad_(False)
        sparsifier = Sparsifier(random_model, mcfg.sparsity, mcfg.train.max_steps)
        sparsifier.apply(sparsifier.plan(state["step"]))  # the checkpoint's densities
        means = cached_means(random_model, None, mcfg, cfg, space)
        result["random_init"] = prune_model(random_model, tokenizer, means, tasks, cfg, out / "random_init",
                                            "random-init control", control=True)
    result["seconds"] = round(time.time() - t0, 1)
    return result


@hydra.main(config_path="../conf", config_name="prune", version_base="1.3")
@reported
def main(dcfg: DictConfig) -> None:
    run(to_object(dcfg, PruneConfig))


if __name__ == "__main__":
    register_configs()
    positional_checkpoint()
    main()
