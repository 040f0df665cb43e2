"""A decomposition against a pruned circuit: are the subcomponents a task needs the circuit's part of the MLP?

`python -m sparse_lm.decompose decompose=tiny_mlp checkpoint=<run> circuit=<circuit json>` decomposes (or resumes)
one block's MLP matrices and compares them, on the task's held-out pairs, with a circuit `python -m sparse_lm.prune`
found on the same checkpoint (docs/decompose.md §Against a circuit):

- **task set H**, per matrix: the subcomponents whose causal importance, at its largest over a context's positions,
  averages above 0.5 over the task's contexts. Beside it, how often they are important on pretraining text (a set
  that is important everywhere is generic, not the task's).
- **overlap**: the share of each subcomponent's squared weight on the circuit's entries of the matrix (its kept
  rows × kept columns), and on the circuit's neurons alone, against the matrix's own share and the share of
  entries (what a piece spread like the matrix, or uniformly, would show).
- **ablation, in this MLP only**, scored as the prune tool scores circuits (raw held-out loss per side): H masked
  to 0 (the other subcomponents and the residual at 1) against as many random live subcomponents, and H kept
  alone; the circuit's neurons of this MLP mean-ablated against as many random neurons, and kept alone.
  The two ablations differ in kind (a rank-one piece of the weights set to zero; a neuron set to its mean), so
  compare each with its own random control before comparing them with each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparse_lm import checkpoint
from sparse_lm.circuits.edges import mlp_matrix_sites
from sparse_lm.circuits.nodes import Ablation, NodeSpace
from sparse_lm.circuits.prune import trained_stats
from sparse_lm.circuits.pruning import accuracy, logit_diff, logit_diffs, side_losses
from sparse_lm.circuits.tasks import TaskData, build
from sparse_lm.config import PruneConfig
from sparse_lm.decompose.components import run_target
from sparse_lm.decompose.spd import SPD
from sparse_lm.errors import UserError
from sparse_lm.roles import site_name

THRESHOLD = 0.5  # causal importance above which a subcomponent counts as important on an input
DRAWS = 20  # random sets per control


def read_circuit(path: str | Path, ckpt: Path) -> tuple[dict, dict]:
    """(the circuit JSON, the prune run's settings), after checking that it holds a circuit of this checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"circuit: {path} does not exist (a <task>.json written by python -m sparse_lm.prune)")
    data = json.loads(path.read_text())
    if not (data.get("circuit") or {}).get("kept"):
        why = "; ".join(data.get("why", [])) or "no circuit reached the target"
        raise UserError(f"circuit: {path} holds no circuit for task {data.get('task')!r} ({why})")
    settings = json.loads((path.parent / "run.json").read_text())["config"]
    try:
        pruned = checkpoint.resolve(settings["checkpoint"]).resolve()  # a run directory, or one of its checkpoints
    except UserError:  # moved or deleted since: compare the names as they are
        pruned = Path(settings["checkpoint"])
    if pruned != ckpt.resolve():
        raise UserError(f"circuit: {path} was pruned on {settings['checkpoint']}, not on the decomposed {ckpt}")
    return data, settings


def mlp_matrices(names: list[str]) -> tuple[int, dict[str, tuple[str, str]]]:
    """(the block, decomposed matrix → (its row site, its column site)); all must be MLP matrices of one block."""
    sites, layers = {}, set()
    for n in names:
        parts = n.split(".")
        layer = int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None
        known = mlp_matrix_sites(layer) if layer is not None else {}
        if n not in known:
            raise UserError(f"circuit: {n!r} is not an MLP matrix (blocks.<layer>.mlp.c_fc or .c_proj); the comparison "
                            "needs matrices whose rows and columns are circuit nodes")
        sites[n] = known[n][:2]
        layers.add(layer)
    if len(layers) > 1:
        raise UserError(f"circuit: modules {names} span several blocks; decompose one block's MLP")
    return layers.pop(), sites


def edge_share(weights: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """[C]: the share of each piece's squared weight ([C, d_out, d_in]) on the entries rows × cols."""
    sq = weights.pow(2)
    on = sq[:, rows][:, :, cols].sum((1, 2)) if rows and cols else torch.zeros(len(sq))
    return on / sq.sum((1, 2)).clamp_min(1e-30)


def batches(data: TaskData, size: int = 64):
    for start in range(0, data.tokens.shape[0], size):
        lengths = data.lengths[start : start + size]
        yield data.tokens[start : start + size, : int(lengths.max())], lengths


@torch.no_grad()
def task_importance(dec: SPD, data: TaskData) -> dict[str, torch.Tensor]:
    """Matrix → [contexts, C]: each subcomponent's largest causal importance over the context's positions."""
    out: dict[str, list] = {n: [] for n in dec.names}
    for tokens, lengths in batches(data):
        _, inputs = run_target(dec.target, lambda m, x: m(x, last=lengths - 1), dec.names, tokens)
        g, _ = dec.importances(inputs)
        valid = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
        for n in dec.names:
            out[n].append((g[n] * valid).amax(1))
    return {n: torch.cat(v) for n, v in out.items()}


@torch.no_grad()
def masked_loss(dec: SPD, data: TaskData, masks: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Raw held-out loss per side and accuracy with each matrix's subcomponents scaled by masks[n] ([C]); None: by
    their causal importance on each input (what the decomposition claims leaves the output unchanged)."""
    deltas = []
    for tokens, lengths in batches(data):
        m = masks
        if m is None:
            _, inputs = run_target(dec.target, lambda mod, x: mod(x, last=lengths - 1), dec.names, tokens)
            m = dec.importances(inputs)[0]
        ones = {n: torch.ones(()) for n in dec.names} if dec.delta else None  # the residual is kept whole
        with dec.masked(m, ones):
            last, _ = dec.target(tokens, last=lengths - 1)
        deltas.append(last[:, data.answers[0]] - last[:, data.answers[1]])
    return scores(torch.cat(deltas))


def scores(delta: torch.Tensor) -> dict[str, float]:
    return {"loss": side_losses(delta).mean().item(), "accuracy": accuracy(delta)}


def spread(rows: list[dict]) -> dict:
    losses = torch.tensor([r["loss"] for r in rows])
    return {"loss": losses.mean().item(), "min": losses.min().item(), "max": losses.max().item(), "draws": len(rows),
            "accuracy": sum(r["accuracy"] for r in rows) / len(rows)}


def compare(dec: SPD, model, tokenizer, mcfg, state: dict, ckpt: Path, circuit_path: str | Path, seed: int = 0, log=print) -> dict:
    data, settings = read_circuit(circuit_path, ckpt)
    task, kept = data["task"], data["circuit"]["kept"]
    layer, sites = mlp_matrices(dec.names)
    test = build(task, tokenizer, "test", 2 * settings["n_test"], settings["seed"], max_len=mcfg.model.ctx_len)
    # the means the prune run ablated with: the same sequences, the same data
    prune_cfg = PruneConfig(mean_sequences=settings["mean_sequences"], means_data=settings.get("means_data"))
    tokens, stats, _ = trained_stats(model, tokenizer, mcfg, state, ckpt, prune_cfg)
    g = torch.Generator().manual_seed(seed)
    log(f"against the {task} circuit of {circuit_path}: {len(test.tokens)} held-out contexts")

    imp = task_importance(dec, test)
    with torch.no_grad():
        _, inputs = dec.run_target(tokens[:16])
        generic = {n: (v > THRESHOLD).float().flatten(0, -2).mean(0) for n, v in dec.importances(inputs)[0].items()}
    report: dict = {"task": task, "circuit": str(circuit_path), "trusted": data.get("trusted"), "why": data.get("why"),
                    "checks": data.get("checks"), "threshold": THRESHOLD, "matrices": {}}
    task_set, live_sets = {}, {}
    for n in dec.names:
        score = imp[n].mean(0)
        H = (score > THRESHOLD).nonzero().flatten()
        live = (generic[n] > 0) | (imp[n] > THRESHOLD).any(0)
        others = (live & (score <= THRESHOLD)).nonzero().flatten()
        task_set[n], live_sets[n] = H, live.nonzero().flatten()
        rows, cols = kept.get(sites[n][0], []), kept.get(sites[n][1], [])
        w = dec.component_weights(n).detach()
        share = edge_share(w, rows, cols)
        target = dec.target_weight(n).detach()
        # The same on the circuit's neurons alone (c_fc's rows, c_proj's columns), whatever the other axis.
        on_rows = sites[n][0].endswith("mlp.neuron")
        everything = list(range(target.shape[1 if on_rows else 0]))
        neurons = (rows, everything) if on_rows else (everything, cols)
        neuron_share = edge_share(w, *neurons)
        report["matrices"][n] = {
            "rows": sites[n][0], "cols": sites[n][1], "circuit_rows": len(rows), "circuit_cols": len(cols),
            "task_set": H.tolist(), "task_importance": score.tolist(), "circuit_share": share.tolist(),
            "live": int(live.sum()), "share_task_set": share[H].mean().item() if len(H) else None,
            "share_other_live": share[others].mean().item() if len(others) else None,
            "share_target": edge_share(target[None], rows, cols).item(),
            "share_entries": len(rows) * len(cols) / target.numel(),
            "neuron_share_task_set": neuron_share[H].mean().item() if len(H) else None,
            "neuron_share_other_live": neuron_share[others].mean().item() if len(others) else None,
            "neuron_share_target": edge_share(target[None], *neurons).item(),
            "neuron_share_entries": len(kept.get(site_name(layer, "mlp_neuron"), [])) / target.shape[0 if on_rows else 1],
            "generic_rate_task_set": generic[n][H].mean().item() if len(H) else None,
            "generic_rate_other_live": generic[n][others].mean().item() if len(others) else None,
        }
        m = report["matrices"][n]
        log(f"  {n}: |H| {len(H)} of {m['live']} live; squared weight on the circuit's {len(rows)}x{len(cols)} entries: "
            f"H {fmt(m['share_task_set'])}, other live {fmt(m['share_other_live'])}, the matrix {m['share_target']:.3f}, "
            f"entries {m['share_entries']:.3f}; on its {m['neuron_share_entries']:.1%} of neurons: H {fmt(m['neuron_share_task_set'])}, "
            f"other live {fmt(m['neuron_share_other_live'])}, the matrix {m['neuron_share_target']:.3f}")

    def keep_masks(drop: dict[str, torch.Tensor], keep_only: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for n in dec.names:
            m = torch.zeros(dec.C) if keep_only else torch.ones(dec.C)
            m[drop[n]] = 1.0 if keep_only else 0.0
            out[n] = m
        return out

    def draw(pool: torch.Tensor, k: int) -> torch.Tensor:
        return pool[torch.randperm(len(pool), generator=g)[: min(k, len(pool))]]

    # Random sets of H's size from all live subcomponents (H included: when H is most of them, so are the draws).
    random_sets = [{n: draw(live_sets[n], len(task_set[n])) for n in dec.names} for _ in range(DRAWS)]
    ab = {"whole model": scores(logit_diff(model, test))}
    ab["all subcomponents"] = masked_loss(dec, test, keep_masks({n: torch.arange(0) for n in dec.names}))
    ab["causal-importance masks"] = masked_loss(dec, test, None)
    ab["H ablated"] = masked_loss(dec, test, keep_masks(task_set))
    ab["random live ablated"] = spread([masked_loss(dec, test, keep_masks(s)) for s in random_sets])
    ab["H alone"] = masked_loss(dec, test, keep_masks(task_set, keep_only=True))
    ab["random live alone"] = spread([masked_loss(dec, test, keep_masks(s, keep_only=True)) for s in random_sets])

    space = NodeSpace.of(model)
    how = Ablation("mean", stats["means"])
    neuron_site = site_name(layer, "mlp_neuron")
    start, width = space.offset(neuron_site), space.dims[space.sites.index(neuron_site)]
    circuit_neurons = torch.tensor(kept.get(neuron_site, []), dtype=torch.long)
    outside = torch.tensor(sorted(set(range(width)) - set(circuit_neurons.tolist())), dtype=torch.long)

    def neurons(idx: torch.Tensor, keep_only: bool = False) -> dict[str, float]:
        keep = torch.ones(space.total)
        if keep_only:
            keep[start : start + width] = 0.0
        keep[start + idx] = 1.0 if keep_only else 0.0
        return scores(logit_diffs(model, space, how, keep, test))

    random_neurons = [draw(outside, len(circuit_neurons)) for _ in range(DRAWS)]
    ab["circuit neurons ablated"] = neurons(circuit_neurons)
    ab["random neurons ablated"] = spread([neurons(r) for r in random_neurons])
    ab["circuit neurons alone"] = neurons(circuit_neurons, keep_only=True)
    ab["random neurons alone"] = spread([neurons(r, keep_only=True) for r in random_neurons])
    report["neuron_site"], report["circuit_neurons"] = neuron_site, len(circuit_neurons)
    report["ablation"] = ab
    report["whole_circuit_ablated"] = data["circuit"].get("without")
    for k, v in ab.items():
        extra = f" (random draws {v['min']:.3f}–{v['max']:.3f})" if "draws" in v else ""
        log(f"  {k:26s} loss {v['loss']:.3f}  accuracy {v['accuracy']:.3f}{extra}")
    return report


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
