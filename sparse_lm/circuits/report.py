"""What `python -m sparse_lm.prune` writes: per task <task>.json (the whole result), <task>.png and <task>.html (the
trained model's circuit), and summary.txt / summary.json with the model and every control side by side.

The score, the geometric mean of edge counts, is given over trusted circuits and, beside it, over every circuit the
trained model has on a task it solves, so a reader sees what the controls removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from sparse_lm.circuits.battery import TaskResult, geometric_mean
from sparse_lm.circuits.draw import draw_html, draw_png
from sparse_lm.circuits.edges import describe
from sparse_lm.circuits.nodes import NodeSpace
from sparse_lm.circuits.tasks import TASKS
from sparse_lm.config import EdgeConventions, PruneConfig
from sparse_lm.fsutil import write_json
from sparse_lm.model import GPT


def fmt(v, spec="{:.3f}") -> str:
    """A number for a table, "-" for a missing one."""
    return "-" if v is None else spec.format(v)


def task_line(res: TaskResult, cfg: PruneConfig) -> str:
    c = res.circuit
    if not c.found:
        return f"no circuit: {'; '.join(res.why)}"
    return (f"circuit: {c.nodes} of {c.total_nodes} nodes, {c.edges['total']} edges, loss {c.circuit.loss:.3f} "
            f"(raw {c.circuit.raw_loss:.3f}, calibrated {c.circuit.calibrated_loss:.3f}; whole model {c.full.loss:.3f}); "
            + ("TRUSTED" if res.trusted else "not trusted: " + "; ".join(res.why)))


def summary(results, cfg: PruneConfig) -> dict:
    solved = [r for r in results.tasks if r.circuit.solved and r.circuit.found]
    trusted = [r for r in results.tasks if r.trusted]
    return {
        "checkpoint": results.checkpoint, "step": results.step, "means_from": results.means_from, "target": cfg.target, "calibration": cfg.calibration.value,
        "ablation": cfg.ablation.value, "frozen_norms": cfg.frozen_norms, "seeds": cfg.seeds, "conventions": asdict(cfg.edges),
        "geometric_mean_edges_trusted": geometric_mean([r.circuit.edges["total"] for r in trusted]),
        "trusted": [r.task for r in trusted],
        "passes_what_ran": [r.task for r in results.tasks if r.passes_what_ran],  # trusted, if the battery was partial
        "geometric_mean_edges_all": geometric_mean([r.circuit.edges["total"] for r in solved]),
        "with_circuit": [r.task for r in solved],
        "not_solved_by_whole_model": [r.task for r in results.tasks if not r.circuit.solved],
        "unusable_with_tokenizer": results.unusable,
        "tasks": [{"task": r.task, "trusted": r.trusted, "why": r.why, "full_loss": r.circuit.full.loss,
                   "full_raw_loss": r.circuit.full.raw_loss, "nodes": r.circuit.nodes,
                   "edges": r.circuit.edges["total"] if r.circuit.edges else None,
                   "circuit_loss": r.circuit.circuit.loss if r.circuit.found else None,
                   "unseen_full_loss": r.unseen["whole"].loss if "whole" in r.unseen else None,
                   "unseen_circuit_loss": r.unseen["circuit"].loss if "circuit" in r.unseen else None,
                   "circuit_calibrated_loss": r.circuit.circuit.calibrated_loss if r.circuit.found else None,
                   "checks": r.checks, "controls": {k: c.passed for k, c in r.controls.items()},
                   "ablations": {k: (c.edges["total"] if c.found else None) for k, c in r.ablations.items()},
                   "seeds": r.seed_spread, "seconds": r.seconds} for r in results.tasks],
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['checkpoint']} (step {s['step']}): target loss {s['target']} per side, judged {s['calibration']}; "
             f"{s['ablation']} ablation{', frozen norms' if s['frozen_norms'] else ''}; edge conventions: "
             f"{describe(EdgeConventions(**s['conventions']))}",
             "held-out loss per side: whole model and circuit on the training families' held-out pairs, then on the unseen "
             "family; calib.: the circuit's loss after its own logit fit",
             f"{'task':<28} {'whole':>6} {'circuit':>8} {'calib.':>7} {'unseen':>13} {'nodes':>6} {'edges':>6}  {'checks':<27} "
             f"{'random_init':<12} {'redrawn':<12} {'nonsense':<12} trusted"]
    for r in s["tasks"]:
        short = {"sufficiency": "suff", "unseen_family": "unseen", "necessity": "nec", "frozen_norms": "frozen"}
        checks = " ".join(f"{short[k]}{'' if ok else ':NO'}" for k, ok in r["checks"].items()) or "-"
        ctrl = {k: ("PASSES" if v else "fails") for k, v in r["controls"].items()}
        unseen = f"{fmt(r['unseen_full_loss'])}/{fmt(r['unseen_circuit_loss'])}"
        lines.append(f"{r['task']:<28} {r['full_loss']:>6.3f} {fmt(r['circuit_loss']):>8} {fmt(r['circuit_calibrated_loss']):>7} "
                     f"{unseen:>13} {fmt(r['nodes'], '{}'):>6} {fmt(r['edges'], '{}'):>6}  {checks:<27} {ctrl.get('random_init', '-'):<12} "
                     f"{ctrl.get('redrawn', '-'):<12} {ctrl.get('nonsense', '-'):<12} "
                     + ("yes" if r["trusted"] else "no: " + "; ".join(r["why"])))
    variants = [r for r in s["tasks"] if r["ablations"] or r["seeds"]]
    if variants:
        lines.append("")
        lines.append(f"{'task':<28} {'edges under other ablations':<32} edges over mask seeds: median [min, max], mean Jaccard of node sets")
        for r in variants:
            abl = ", ".join(f"{k} {fmt(v, '{}')}" for k, v in r["ablations"].items()) or "-"
            sp = r["seeds"]
            seeds = "-" if not sp else (f"{fmt(sp['median_edges'], '{:g}')} [{fmt(sp['min_edges'], '{}')}, {fmt(sp['max_edges'], '{}')}], "
                                        f"J {fmt(sp['mean_jaccard'], '{:.2f}')} ({sp['found']}/{sp['seeds']} seeds found one)")
            lines.append(f"{r['task']:<28} {abl:<32} {seeds}")
    lines.append("")
    gm_t, gm_a = s["geometric_mean_edges_trusted"], s["geometric_mean_edges_all"]
    lines.append(f"geometric mean of edges over {len(s['trusted'])} trusted circuit(s): {fmt(gm_t, '{:.1f}')}"
                 + ("" if gm_t else " (no trusted circuit: no score)"))
    lines.append(f"geometric mean of edges over all {len(s['with_circuit'])} circuit(s) on tasks the whole model solves, trusted or not: "
                 f"{fmt(gm_a, '{:.1f}')}")
    if s["not_solved_by_whole_model"]:
        lines.append(f"not solved by the whole model (no circuit searched): {', '.join(s['not_solved_by_whole_model'])}")
    for task, why in s["unusable_with_tokenizer"].items():
        lines.append(f"unusable with this tokenizer: {task}: {why}")
    return "\n".join(lines)


def node_info(res: TaskResult, results, before: int = 6, after: int = 3) -> dict[str, dict]:
    """For each kept node of the trained model's circuit: its mean, its top-activating pretraining contexts and the
    loss change when it alone is ablated (what the page's node panel shows)."""
    if results.tokens is None or not results.stats:
        return {}
    T, rows, decode = results.tokens.shape[1], results.tokens.tolist(), results.decode
    info = {}
    for site, channels in res.circuit.kept.items():
        for c in channels:
            top = []
            for value, where in zip(results.stats["top_values"][site][:, c].tolist(), results.stats["top_positions"][site][:, c].tolist()):
                row, t = rows[where // T], where % T
                top.append({"before": "".join(map(decode, row[max(0, t - before):t])), "token": decode(row[t]),
                            "after": "".join(map(decode, row[t + 1:t + 1 + after])), "value": value})
            label = f"{site}[{c}]"
            info[label] = {"mean": float(results.stats["means"][site][c]), "top": top, "effect": res.node_effects.get(label)}
    return info


def write(results, model: GPT, cfg: PruneConfig, out: Path) -> None:
    """Every file of an invocation into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    space = NodeSpace.of(model)
    dims = dict(zip(space.sites, space.dims))
    for r in results.tasks:
        write_json(out / f"{r.task}.json", {**asdict(r), "seed_spread": r.seed_spread})
        c = r.circuit
        if not c.found or not c.kept:  # no circuit, or an empty one (the task solved with every node ablated)
            continue
        title = f"{r.task}: {c.nodes} nodes, {c.edges['total']} edges" + ("" if r.trusted else " (not trusted)")
        info = [("answers", " vs ".join(repr(a) for a in r.answers)),
                ("held-out loss per side", f"whole model {c.full.loss:.3f}, circuit {c.circuit.loss:.3f} "
                                           f"(raw {c.circuit.raw_loss:.3f}, calibrated {c.circuit.calibrated_loss:.3f}; target {cfg.target}, judged {cfg.calibration.value})"),
                ("edges", ", ".join(f"{k} {v}" for k, v in c.edges.items())), ("conventions", describe(cfg.edges)),
                ("trusted", "yes" if r.trusted else "no: " + "; ".join(r.why))]
        if c.without is not None:
            info.append(("whole model without the circuit", f"loss {c.without.loss:.3f}"))
        draw_png(out / f"{r.task}.png", title, model.cfg.n_layer, dims, r.edge_list, c.kept)
        draw_html(out / f"{r.task}.html", title, info, model.cfg.n_layer, dims, r.edge_list, c.kept, node_info(r, results))
    s = summary(results, cfg)
    write_json(out / "summary.json", s)
    text = format_summary(s)
    (out / "summary.txt").write_text(text + "\n")
    print(text)


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
