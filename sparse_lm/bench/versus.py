"""`python -m sparse_lm.bench mode=versus baseline=<git revision>`: this checkout's training against another revision's.

The baseline's `sparse_lm` package and `conf/` are taken from git (`git archive`) into a temporary directory and
imported under another name. Each side composes its own default config (plus `versus_overrides`), builds its model
from the same seed on the same token cache (the initial weights are compared), and the sides take optimizer steps in
turn, `versus_chunk` steps at a time, over the whole schedule (or `versus_steps`), so they share the machine's
conditions. Reported:

- tokens/s of each, over all steps and per phase (dense, anneal, final density), and their ratio;
- the largest per-step loss difference, next to a yardstick for fp32 noise: the baseline against itself with every
  initial weight moved by one ulp (`versus_noise_steps` steps);
- whether the projection keeps the same entries: every `versus_check_every` steps this checkout's projection is
  compared with the baseline's projection function on the same pre-projection weights (time not counted).

glibc's malloc state belongs to a process and depends on its history, which one process cannot give two sides
faithfully: with `versus_processes=true` (default) each side runs in a process of its own (the baseline with malloc's
own behaviour, this checkout with its settings, sparse_lm.hostmem), driven in turns from this one; with false, all
sides share this process and the baseline's turns emulate malloc's default (thresholds at 32 MB / 64 MB, where its
dynamic ones settle at most). A third side, the baseline with this checkout's malloc settings, shows how much of the
gain the allocator alone gives.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import multiprocessing as mp
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import sparse_lm
from sparse_lm.cli import CHECKOUT, compose_fresh
from sparse_lm.hostmem import KEEP, set_malloc
from sparse_lm.config import BenchConfig

REPO = CHECKOUT
GLIBC_DEFAULT = (32 << 20, 64 << 20)  # where malloc's dynamic mmap and trim thresholds settle on 64-bit Linux


def import_revision(rev: str, name: str = "sparse_lm_baseline") -> tuple[object, Path]:
    """The package `sparse_lm` of git revision `rev`, imported as `name`; and that revision's conf/ directory."""
    dest = Path(tempfile.mkdtemp(prefix="versus-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "sparse_lm", "conf"], capture_output=True)
    if archive.returncode:
        raise ValueError(f"baseline={rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    (dest / "sparse_lm").rename(dest / name)
    for path in (dest / name).rglob("*.py"):
        path.write_text(re.sub(r"\b(from|import) sparse_lm\b", rf"\1 {name}", path.read_text()))
    sys.path.insert(0, str(dest))
    return importlib.import_module(name), dest / "conf"


def compose_in(conf_dir: Path, package, overrides: list[str]):
    """Compose `conf_dir`'s config with `package`'s schemas, inside or outside a running Hydra app."""
    package.config.register_configs()  # the ConfigStore is global: each side registers its schemas just before composing
    return package.config.to_object(compose_fresh(conf_dir, "config", overrides))


class Side:
    """One implementation's training run, stepped from outside."""

    def __init__(self, label: str, package, conf_dir: Path, overrides: list[str], malloc: tuple[int, int] | None):
        trainer = importlib.import_module(f"{package.__name__}.trainer")
        dist_mod = importlib.import_module(f"{package.__name__}.distributed")
        cache = importlib.import_module(f"{package.__name__}.data.cache")
        self.label, self.package, self.trainer, self.malloc = label, package, trainer, malloc
        self.cfg = compose_in(conf_dir, package, overrides + ["train.device=cpu"])
        dist = dist_mod.Dist(device=torch.device("cpu"))
        self.run = trainer.build_run(self.cfg, Path(tempfile.mkdtemp(prefix=f"versus-{label}-")), dist, cache.prepare(self.cfg.data),
                                     trainer.check_config(self.cfg, dist))
        self.losses: list[float] = []
        self.seconds: list[float] = []  # per step

    def steps(self, n: int, excluded: list[float] | None = None) -> None:
        if self.malloc is not None:
            set_malloc(*self.malloc)
        for _ in range(n):
            before = sum(excluded) if excluded is not None else 0.0
            t0 = time.perf_counter()
            loss, _ = self.trainer.train_step(self.run)
            value = loss.item()
            spent = time.perf_counter() - t0 - ((sum(excluded) - before) if excluded is not None else 0.0)
            self.losses.append(value)
            self.seconds.append(spent)


def state_hash(side: Side) -> str:
    """A digest of the model's initial weights, to check that every side starts from the same ones."""
    h = hashlib.sha256()
    for t in side.run.model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def serve(conn, rev: str, which: str, overrides: list[str], malloc: str, check_every: int | None, perturb: bool) -> None:
    """A side in a process of its own: build it, then take the steps asked for until told to stop."""
    if malloc == "keep":
        set_malloc(*KEEP)
    baseline_pkg, baseline_conf = import_revision(rev)
    package, conf = (sparse_lm, REPO / "conf") if which == "this" else (baseline_pkg, baseline_conf)
    side = Side(which, package, conf, overrides, None)
    if perturb:
        perturbed_by_one_ulp(side)
    survivors, excluded = [], []
    if check_every:
        check_survivors(side, baseline_pkg, check_every, survivors, excluded)
    conn.send({"init": state_hash(side), "tokens_per_step": side.run.tokens_per_step, "max_steps": side.cfg.train.max_steps,
               "anneal": (side.cfg.sparsity.anneal_start, side.cfg.sparsity.anneal_end)})
    while (n := conn.recv()) is not None:
        checked = len(survivors)
        side.steps(n, excluded)
        conn.send({"losses": side.losses[-n:], "seconds": side.seconds[-n:], "survivors": survivors[checked:]})


class RemoteSide:
    """The interface of a Side, for one running in its own process."""

    def __init__(self, rev: str, which: str, overrides: list[str], malloc: str, check_every: int | None = None,
                 perturb: bool = False):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, rev, which, overrides, malloc, check_every, perturb), daemon=True)
        self.proc.start()
        self.info = self.conn.recv()
        self.losses, self.seconds, self.survivors = [], [], []

    def steps(self, n: int) -> None:
        self.conn.send(n)
        reply = self.conn.recv()
        self.losses += reply["losses"]
        self.seconds += reply["seconds"]
        self.survivors += reply["survivors"]

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=60)


def check_survivors(side: Side, baseline_pkg, every: int, record: list[dict], excluded: list[float]) -> None:
    """Wrap this checkout's projection: every `every` steps, compare it with the baseline's on the same weights."""
    sparsifier = side.run.sparsifier
    apply = sparsifier.apply
    reference = importlib.import_module(f"{baseline_pkg.__name__}.sparsity").projection_mask

    def checked(plan) -> None:
        if plan.step % every:
            return apply(plan)
        t0 = time.perf_counter()
        same, total = 0, 0
        for sp in sparsifier.params:  # the masks themselves, on the weights the projection is about to see
            k = plan.k[sp.name]
            if k >= sp.param.numel():
                continue
            total += 1
            j = sparsifier.j(sp)
            same += bool(torch.equal(sparsifier.mask_fn(sp, k, j), reference(sp.param.detach(), k, j, sp.neuron_axis)))
        record.append({"step": plan.step, "params_checked": total, "identical": same})
        excluded.append(time.perf_counter() - t0)
        apply(plan)

    sparsifier.apply = checked


def perturbed_by_one_ulp(side: Side) -> None:
    with torch.no_grad():
        for p in side.run.model.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))


def phases(max_steps: int, anneal: tuple[float, float], steps: int) -> dict[str, range]:
    start, end = round(anneal[0] * max_steps), round(anneal[1] * max_steps)
    return {"dense": range(0, min(start, steps)), "anneal": range(min(start, steps), min(end, steps)), "final": range(min(end, steps), steps)}


def tokens_per_sec(side, tokens_per_step: int, steps: range) -> float | None:
    if not len(steps):
        return None
    return len(steps) * tokens_per_step / sum(side.seconds[i] for i in steps)


def local_sides(bench: BenchConfig) -> tuple[dict, object]:
    """The three sides in this process (malloc emulated per turn), and a maker of the fp32-noise yardstick."""
    baseline_pkg, baseline_conf = import_revision(bench.baseline)
    sides = {
        "baseline": Side("baseline", baseline_pkg, baseline_conf, bench.versus_overrides, GLIBC_DEFAULT),
        "baseline+malloc": Side("baseline+malloc", baseline_pkg, baseline_conf, bench.versus_overrides, KEEP),
        "this checkout": Side("this", sparse_lm, REPO / "conf", bench.versus_overrides, KEEP),
    }
    this = sides["this checkout"]
    this.survivors, excluded = [], []
    check_survivors(this, baseline_pkg, bench.versus_check_every, this.survivors, excluded)
    this.steps = functools.partial(Side.steps, this, excluded=excluded)
    for side in sides.values():
        side.info = {"init": state_hash(side), "tokens_per_step": side.run.tokens_per_step, "max_steps": side.cfg.train.max_steps,
                     "anneal": (side.cfg.sparsity.anneal_start, side.cfg.sparsity.anneal_end)}

    def yardstick():
        side = Side("ulp", baseline_pkg, baseline_conf, bench.versus_overrides, KEEP)
        perturbed_by_one_ulp(side)
        return side

    return sides, yardstick


def remote_sides(bench: BenchConfig) -> tuple[dict, object]:
    """The three sides, each in a process of its own."""
    rev, ov = bench.baseline, bench.versus_overrides
    sides = {"baseline": RemoteSide(rev, "baseline", ov, "default"), "baseline+malloc": RemoteSide(rev, "baseline", ov, "keep"),
             "this checkout": RemoteSide(rev, "this", ov, "keep", check_every=bench.versus_check_every)}
    return sides, lambda: RemoteSide(rev, "baseline", ov, "keep", perturb=True)


def run_versus(bench: BenchConfig, out_dir: Path) -> dict:
    sides, make_yardstick = remote_sides(bench) if bench.versus_processes else local_sides(bench)
    this = sides["this checkout"]
    steps = bench.versus_steps or this.info["max_steps"]
    same_init = len({side.info["init"] for side in sides.values()}) == 1
    print(f"[{time.strftime('%H:%M:%S')}] baseline {bench.baseline} vs this checkout: {steps} steps each, in turns of "
          f"{bench.versus_chunk}, {'a process each' if bench.versus_processes else 'in one process'}; same initial weights: {same_init}",
          flush=True)
    done = 0
    while done < steps:
        n = min(bench.versus_chunk, steps - done)
        for side in sides.values():
            side.steps(n)
        done += n
        last = {k: f"{s.losses[-1]:.4f}" for k, s in sides.items()}
        recent = {k: sum(s.seconds[-n:]) / n * 1e3 for k, s in sides.items()}
        print(f"[{time.strftime('%H:%M:%S')}] step {done}/{steps} | loss {last} | ms/step "
              + ", ".join(f"{k} {v:.0f}" for k, v in recent.items()), flush=True)

    noise_steps = min(bench.versus_noise_steps, steps)
    yardstick = make_yardstick()
    yardstick.steps(noise_steps)
    for side in (*sides.values(), yardstick):
        if isinstance(side, RemoteSide):
            side.close()

    base = sides["baseline"]
    result = {"baseline": bench.baseline, "steps": steps, "overrides": bench.versus_overrides, "processes": bench.versus_processes,
              "same_initial_weights": same_init, "sides": {}}
    tps = this.info["tokens_per_step"]
    for label, side in sides.items():
        row = {"tokens_per_sec": tokens_per_sec(side, tps, range(steps)),
               "phases": {p: tokens_per_sec(side, tps, r) for p, r in phases(this.info["max_steps"], this.info["anneal"], steps).items()},
               "losses": side.losses}
        row["speedup"] = row["tokens_per_sec"] / tokens_per_sec(base, tps, range(steps))
        row["max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(side.losses, base.losses))
        row["max_abs_loss_diff_first"] = max(abs(a - b) for a, b in zip(side.losses[:noise_steps], base.losses[:noise_steps]))
        result["sides"][label] = row
    result["noise_yardstick"] = {"steps": noise_steps, "losses": yardstick.losses, "max_abs_loss_diff": max(
        abs(a - b) for a, b in zip(yardstick.losses, base.losses[:noise_steps]))}
    result["survivor_checks"] = this.survivors
    result["environment"] = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    write_report(result, out_dir)
    return result


def write_report(result: dict, out_dir: Path) -> None:
    noise = result["noise_yardstick"]
    checks = result["survivor_checks"]
    lines = [f"this checkout vs {result['baseline']}, {result['steps']} steps each, {result['environment']}",
             f"{'run':<18} {'tokens/s':>9} {'dense':>8} {'anneal':>8} {'final':>8} {'speed-up':>9} "
             f"{'max |Δloss| first ' + str(noise['steps']):>22} {'max |Δloss| all':>16}"]
    for label, row in result["sides"].items():
        ph = row["phases"]
        cell = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        lines.append(f"{label:<18} {row['tokens_per_sec']:>9,.0f} {cell(ph['dense']):>8} {cell(ph['anneal']):>8} {cell(ph['final']):>8} "
                     f"{row['speedup']:>8.2f}x {row['max_abs_loss_diff_first']:>22.2e} {row['max_abs_loss_diff']:>16.2e}")
    lines.append(f"fp32 noise yardstick (baseline vs itself with initial weights moved 1 ulp, {noise['steps']} steps): "
                 f"max |Δloss| {noise['max_abs_loss_diff']:.2e}")
    identical = sum(c["identical"] for c in checks)
    total = sum(c["params_checked"] for c in checks)
    lines.append(f"projection survivors identical to the baseline's projection_mask: {identical}/{total} parameter-steps "
                 f"(at {len(checks)} steps)")
    table = "\n".join(lines)
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, out_dir / "versus.png")
    print(table)
    print(f"\nwrote {out_dir}/table.txt, results.json, versus.png")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    labels = list(result["sides"])
    left.bar(labels, [result["sides"][k]["tokens_per_sec"] for k in labels], color=["gray", "silver", "tab:blue"])
    left.set(title="training tokens/s (whole run)")
    base = result["sides"]["baseline"]["losses"]
    for label in labels:
        row = result["sides"][label]
        mid.plot(range(1, len(row["losses"]) + 1), row["losses"], lw=1, label=label)
        if label != "baseline":
            right.semilogy(range(1, len(base) + 1), [abs(a - b) + 1e-12 for a, b in zip(row["losses"], base)], lw=1, label=label)
    noise = result["noise_yardstick"]["losses"]
    right.semilogy(range(1, len(noise) + 1), [abs(a - b) + 1e-12 for a, b in zip(noise, base)], "k:", lw=1,
                   label="baseline, weights moved 1 ulp (fp32 noise)")
    mid.set(title="training loss", xlabel="step")
    right.set(title="|loss − baseline loss|", xlabel="step")
    mid.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
