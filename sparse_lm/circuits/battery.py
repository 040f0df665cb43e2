"""A task's circuit and the faithfulness battery around it (docs/method.md §5): compute only, no files.

For each task: the trained model's circuit (mask seed `cfg.seed`, `cfg.ablation`), its own checks, and every control
asked for. A circuit is **trusted** only if every check and control below ran, it passes its checks and no control reaches
the target (so only with `controls=all` and `check=true`):

  checks    sufficiency (the circuit alone reaches the target on held-out pairs the bisection did not see: the
            second half of the test split), unseen_family (it also does on held-out pairs of a template family never
            used in training), necessity (the whole model without it fails), frozen_norms (it still reaches the
            target with every norm frozen to the whole model's scale on the same input)
  controls  random_init and redrawn (the same search on a model that knows nothing: must find no circuit),
            nonsense (the task with coin-flip labels: the whole model and every circuit must fail it)
  variants  ablations (the search again under the other ablation modes) and seeds (the search again with other
            mask seeds): sizes and overlaps reported, not pass/fail
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from sparse_lm.circuits.controls import nonsense
from sparse_lm.circuits.edges import Edge, circuit_edges, count_by_kind
from sparse_lm.circuits.nodes import Ablation, NodeSpace
from sparse_lm.circuits.pruning import Evaluation, Judge
from sparse_lm.circuits.search import Circuit, find_circuit
from sparse_lm.circuits.tasks import TaskData
from sparse_lm.config import Ablation as AblationMode
from sparse_lm.config import CONTROLS, PruneConfig
from sparse_lm.errors import UserError
from sparse_lm.model import GPT


@dataclass
class Subject:
    """A model the battery searches, with how its pruned nodes are ablated (its own means)."""

    label: str  # "trained model", "random_init", "redrawn"
    model: GPT
    means: dict[str, torch.Tensor]
    source: torch.Tensor  # pretraining token ids (resample ablation)

    def ablation(self, mode: str, frozen_norms: bool, seed: int) -> Ablation:
        return Ablation(mode, self.means, self.source, frozen_norms, seed)


@dataclass
class Control:
    name: str
    circuit: Circuit  # the control's search
    passed: bool = field(init=False)  # it reached the target (its whole model, or a circuit): the real one is not trusted

    def __post_init__(self):
        self.passed = self.circuit.solved or self.circuit.found


@dataclass
class TaskResult:
    task: str
    answers: tuple[str, str]
    circuit: Circuit  # the trained model's
    edge_list: list[Edge] = field(default_factory=list)
    unseen: dict[str, Evaluation] = field(default_factory=dict)  # "whole" and "circuit" on the unseen family
    checks: dict[str, bool] = field(default_factory=dict)
    controls: dict[str, Control] = field(default_factory=dict)
    ablations: dict[str, Circuit] = field(default_factory=dict)  # the other ablation modes
    seeds: list[Circuit] = field(default_factory=list)  # every mask seed, the main one first
    node_effects: dict[str, float] = field(default_factory=dict)  # "site[channel]" -> loss change when it alone is ablated
    trusted: bool = False
    why: list[str] = field(default_factory=list)  # what keeps it from being trusted
    seconds: float = 0.0

    @property
    def passes_what_ran(self) -> bool:
        """Trusted as far as the battery that ran can tell: a circuit whose only shortfall is checks or controls not run."""
        return self.circuit.found and all(w.startswith(NOT_RUN) for w in self.why)

    @property
    def seed_spread(self) -> dict | None:
        found = [c for c in self.seeds if c.found]
        if len(self.seeds) < 2:
            return None
        edges = [c.edges["total"] for c in found]
        sets = [{(s, i) for s, ch in c.kept.items() for i in ch} for c in found]
        pairs = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:] if a | b]
        return {"seeds": len(self.seeds), "found": len(found), "edges": edges,
                "median_edges": statistics.median(edges) if edges else None,
                "min_edges": min(edges) if edges else None, "max_edges": max(edges) if edges else None,
                "mean_jaccard": sum(pairs) / len(pairs) if pairs else None}


def controls_asked(cfg: PruneConfig) -> set[str]:
    asked = set(CONTROLS) if cfg.controls == "all" else ({cfg.controls} if isinstance(cfg.controls, str) else set(cfg.controls))
    unknown = asked - set(CONTROLS)
    if unknown:
        raise UserError(f"controls: unknown {sorted(unknown)}; choose all or a list from {list(CONTROLS)}")
    return asked


def with_edges(circuit: Circuit, model: GPT, train: TaskData, test: TaskData, cfg: PruneConfig, token_text) -> list[Edge]:
    if not circuit.found:
        return []
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    edges = circuit_edges(weights, model.cfg.n_layer, model.cfg.d_head, circuit.kept, test.token_ids(), train.answers, cfg.edges,
                          token_text=token_text)
    circuit.edges = count_by_kind(edges)
    return edges


REQUIRED_CHECKS = ("sufficiency", "unseen_family", "necessity", "frozen_norms")
REQUIRED_CONTROLS = ("random_init", "redrawn", "nonsense")
NOT_RUN = "not run: "  # how `why` names the checks and controls that did not run


def run_task(trained: Subject, controls: dict[str, Subject], train: TaskData, test: TaskData, unseen: TaskData | None,
             cfg: PruneConfig, token_text=str, log=print) -> TaskResult:
    """`test` holds held-out pairs of the training families, its first half for the bisection and its second half
    for the sufficiency check; `unseen` (if any) pairs of a family never used in training."""
    search_pairs, check_pairs = test.halves()
    t0 = time.time()
    asked = controls_asked(cfg)
    mode = cfg.ablation.value

    def search(subject: Subject, tr: TaskData, te: TaskData, seed: int, ablation: str = mode, control: bool = False,
               edges: list | None = None) -> Circuit:
        c = find_circuit(subject.model, subject.ablation(ablation, cfg.frozen_norms, seed), tr, te, cfg, seed, control, log)
        found = with_edges(c, subject.model, tr, te, cfg, token_text)
        if edges is not None:
            edges.extend(found)
        return c

    log(f"  {trained.label}:")
    edge_list: list[Edge] = []
    main = search(trained, train, search_pairs, cfg.seed, edges=edge_list)
    res = TaskResult(train.name, train.answer_text, main, edge_list)
    space = NodeSpace.of(trained.model)

    def judge(pairs: TaskData, frozen_norms: bool = cfg.frozen_norms) -> Judge:
        """The trained model's circuit scored on `pairs`, as the search scored its candidates."""
        return Judge(trained.model, space, trained.ablation(mode, frozen_norms, cfg.seed), train.subset(cfg.n_calib), pairs, cfg.calibration)

    keep = space.flat(main.kept)
    if unseen is not None:
        on_unseen = judge(unseen)
        res.unseen["whole"] = on_unseen(torch.ones(space.total))
        if main.found:
            res.unseen["circuit"] = on_unseen(keep)
    if main.found:
        res.checks["sufficiency"] = judge(check_pairs)(keep).loss <= cfg.target
        if unseen is not None:
            res.checks["unseen_family"] = res.unseen["circuit"].loss <= cfg.target
        if main.without is not None:
            res.checks["necessity"] = main.without.loss > cfg.target
        if main.nodes <= cfg.node_effects:
            res.node_effects = node_effects(judge(search_pairs), space, main)
        if "frozen_norms" in asked or cfg.frozen_norms:  # with frozen_norms=true the search itself froze them
            res.checks["frozen_norms"] = judge(check_pairs, frozen_norms=True)(keep).loss <= cfg.target
    # Variants only where there is a circuit to vary; controls always (they tell whether the judging can be fooled).
    res.seeds = [main] + [search(trained, train, search_pairs, cfg.seed + i) for i in range(1, cfg.seeds if main.found else 1)]
    if "ablations" in asked and main.found:
        for other in AblationMode:
            if other.value != mode:
                log(f"  {trained.label}, {other.value} ablation:")
                res.ablations[other.value] = search(trained, train, search_pairs, cfg.seed, other.value)
    for name, subject in controls.items():
        log(f"  control {name}:")
        res.controls[name] = Control(name, search(subject, train, search_pairs, cfg.seed, control=True))
    if "nonsense" in asked:
        log("  control nonsense (coin-flip labels):")
        res.controls["nonsense"] = Control("nonsense", search(trained, nonsense(train, cfg.seed), nonsense(search_pairs, cfg.seed + 1),
                                                              cfg.seed, control=True))
    whole_unseen = res.unseen.get("whole")
    res.why = ([] if main.solved else ["the whole model does not reach the target"]) + \
              ([] if whole_unseen is None or whole_unseen.loss <= cfg.target else ["the whole model fails the unseen family"]) + \
              ([] if main.found or not main.solved else ["no circuit reaches the target"]) + \
              [f"fails {k}" for k, ok in res.checks.items() if not ok] + \
              [f"control {k} reaches the target" for k, c in res.controls.items() if c.passed]
    if main.found:
        missing = [k for k in REQUIRED_CHECKS if k not in res.checks] + [k for k in REQUIRED_CONTROLS if k not in res.controls]
        res.why += [NOT_RUN + ", ".join(missing)] if missing else []
    res.trusted = main.found and not res.why
    res.seconds = round(time.time() - t0, 1)
    return res


def node_effects(judge: Judge, space: NodeSpace, circuit: Circuit) -> dict[str, float]:
    """Held-out loss change when each kept node alone is ablated from the circuit (`judge`: as the search scored)."""
    keep = space.flat(circuit.kept)
    out = {}
    for site, channels in circuit.kept.items():
        for c in channels:
            without = keep.clone()
            without[space.offset(site) + c] = 0
            out[f"{site}[{c}]"] = judge(without).loss - circuit.circuit.loss
    return out


def geometric_mean(values: list[int]) -> float | None:
    return math.exp(sum(math.log(max(v, 1)) for v in values) / len(values)) if values else None
