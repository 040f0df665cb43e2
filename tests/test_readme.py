"""Every command the README shows works as printed: each line of its ```bash blocks is either run here, in a fresh
directory (with small overrides appended where the full command takes minutes), or listed with the reason it cannot
run on a CPU test machine. A new README command without an entry below fails the first test. The first command runs
first; then each tool's commands run in README order, two tools at a time."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import pytest

from tests.conftest import REPO

SMALL = ["train.max_steps=4", "train.eval_interval=2", "train.ckpt_interval=2", "train.eval_sequences=8"]
# The reference shapes shrunk to one narrow layer: the paper densities still fit the j-per-neuron rule at d_model 256.
PAPER_SMALL = ["model.n_layer=1", "model.d_model=256", "model.d_mlp=1024", "model.ctx_len=64", "train.batch_size=16",
               "train.compile=false", *SMALL]
PRUNE_SMALL = ["steps=10", "n_train=32", "n_test=16", "n_calib=16"]
BENCH_SMALL = ["warmup_ms=1", "rep_ms=5", "densities=[0.1]", "cpu_tokens=128", "cpu_shapes=[[64,32]]", "cpu_abstopk_dims=[64]",
               "cpu_select_shape=[64,64]", "train_steps=1", "cpu_compare_steps=2",
               "cpu_train_overrides=['preset=tiny','model.n_layer=1','train.batch_size=2']"]
# Two one-layer runs of 4 steps (one size: a sparse run and a dense baseline), pruned on one task.
FRONTIER_SMALL = ["~sizes.d64", "steps=4", "densities=[0.25]", "seeds=[0]", "dense_steps=[4]",
                  "train_overrides=['preset=tiny','model.n_layer=1','train.eval_interval=2','train.ckpt_interval=2','train.eval_sequences=8']",
                  "prune_overrides=['tasks=[single_double_quote]','steps=10','n_train=32','n_test=16','n_calib=16','controls=[random_init,nonsense]']"]
VERSUS_SMALL = ["versus_steps=2", "versus_noise_steps=1", "versus_check_every=1"]

# README command (as shlex splits it, without its comment) -> extra arguments, or the reason it is not run.
COMMANDS: dict[str, list[str] | str] = {
    "python -m venv .venv && . .venv/bin/activate": "installation: .ci/run performs it in a fresh clone",
    'pip install torch==2.13.0 && pip install -e .[test]': "installation: .ci/run performs it in a fresh clone",
    "python -m pytest -q": "the test suite itself",
    "python train.py": SMALL,
    "python -m sparse_lm.sample runs/tiny prompt='def parse(' num_samples=2 max_new_tokens=80 seed=0": [],
    "python train.py preset=paper kernels=fast name=paper-fast": "needs a CUDA GPU (tests/test_gpu.py)",
    "python train.py preset=paper kernels.backend=torch_sparse name=paper-csr": PAPER_SMALL,
    "python -m sparse_lm.bench": BENCH_SMALL,
    "python -m sparse_lm.bench mode=train": BENCH_SMALL,
    "python -m sparse_lm.bench mode=versus baseline=3f6f79b": VERSUS_SMALL,
    "python -m kernels.check": "tests/test_kernels_check.py runs it (the reduced mode, about a minute)",
    "python -m sparse_lm.bench.static --sm90 ../shared/tools/sm90.py": "needs the sm_90 compile tool, which lives outside "
        "the repository (tests/test_bench_static.py checks its SASS parsing)",
    "python -m sparse_lm.prune checkpoint=runs/tiny tasks=all": PRUNE_SMALL,
    "python -m sparse_lm.prune runs/tiny tasks=[bracket_counting] controls=[random_init] out_dir=runs/tiny/circuits/control": PRUNE_SMALL,
    "python -m sparse_lm.prune runs/tiny tasks=[dict_key_quote] controls=all seeds=3 out_dir=runs/tiny/circuits/battery": PRUNE_SMALL,
    "python -m sparse_lm.frontier frontier=cpu": FRONTIER_SMALL,
    "python -m sparse_lm.frontier frontier=cpu stage=collect": FRONTIER_SMALL,  # the same sweep: nothing to launch
    "python -m sparse_lm.frontier frontier=cpu launcher=submitit_local": FRONTIER_SMALL,
    "python -m sparse_lm.frontier frontier=paper launcher=submitit_slurm launcher_overrides=[hydra.launcher.partition=gpu,hydra.launcher.gpus_per_node=1,hydra.launcher.timeout_min=4320]":
        "needs a Slurm cluster and GPUs (the same code runs through submitit_local above)",
    "python -m sparse_lm.decompose decompose=tms_40_10": ["toy.steps=100", "steps=4", "batch_size=128", "eval_interval=2", "ckpt_interval=2"],
    "python -m sparse_lm.decompose decompose=tiny_mlp checkpoint=runs/tiny pattern=true":
        ["steps=3", "batch_size=2", "ctx=16", "C=8", "eval_interval=3", "ckpt_interval=3"],
    "python -m sparse_lm.prune runs/frontier-cpu/runs/d128-dense-1200-s0 tasks=[single_double_quote] controls=all out_dir=runs/frontier-cpu/runs/d128-dense-1200-s0/circuits/battery":
        "needs the frontier's models (10 min of pruning on them); the prune command above runs here on the tiny run",
    "python -m sparse_lm.decompose decompose=tiny_mlp checkpoint=runs/frontier-cpu/runs/d128-dense-1200-s0 circuit=runs/frontier-cpu/runs/d128-dense-1200-s0/circuits/battery/single_double_quote.json":
        "needs the frontier's models and their circuit; tests/test_decompose_circuit.py runs the comparison on a "
        "40-step run with a hand-made circuit",
    "python -m sparse_lm.plateaus runs/tiny": ["n_prompts=12", "n_bases=4", "steps=5", "bootstrap=50", "ctx=8"],
    "pip install -e .[reference]": "installation: .ci/run installs the test extras, which include tiktoken",
    "python -m sparse_lm.prune checkpoint=models/csp_yolo1 tasks=all": "needs a released model (a download); "
        "tests/test_reference.py prunes an exported one in the same format, given as a directory",
    "python -m sparse_lm.convert to_reference runs/tiny runs/tiny-reference": [],
    "python -m sparse_lm.convert from_reference runs/tiny-reference runs/tiny-back": [],
    "python train.py train.max_steps=1000 optim.lr=0.02 name=tiny-long": SMALL,
    "python train.py preset=paper train.micro_batch_size=16 name=paper-mb16": PAPER_SMALL,
    "python train.py sparsity=dense name=tiny-dense": SMALL,
    "python train.py sparsity.anneal=exp sparsity.sparsify_biases=true name=tiny-exp": SMALL,
    "python train.py model.topk_sites=[attn_q,attn_k,mlp_neuron] model.afrac=0.5 name=tiny-qk": SMALL,
    "python train.py --cfg job": [],
    "tensorboard --logdir runs": "starts a server (the TensorBoard files are checked in tests/test_train.py)",
    "python train.py train.resume=auto": SMALL,
    # The small run has checkpoints at steps 2 and 4, not 400: the same command on its step-2 checkpoint.
    "python train.py train.resume=runs/tiny/checkpoints/step-000400 hydra.run.dir=runs/tiny-branch": SMALL,
    "python train.py -m sparsity.hidden_density=0.25,0.125,0.0625": SMALL,
    "torchrun --standalone --nproc_per_node=2 train.py name=tiny-ddp": SMALL,
    "torchrun --standalone --nproc_per_node=8 train.py preset=paper": "needs 8 GPUs",
    "python -m sparse_lm.inspect runs/tiny": [],
    "python -m sparse_lm.sample runs/tiny prompt='def parse(' num_samples=3 temperature=0.8 top_k=50 seed=0": [],
}
SUBSTITUTE = {"step-000400": "step-000002"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(key, argv as a shell would split it) for every command line of the README's bash blocks, in order."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                lines.append((" ".join(tokens), tokens))
    return lines


def test_every_readme_command_is_run_here_or_has_a_reason():
    commands = [key for key, _ in readme_commands()]
    assert set(commands) == set(COMMANDS), {"new in README": set(commands) - set(COMMANDS), "gone": set(COMMANDS) - set(commands)}


def argv(tokens: list[str]) -> list[str]:
    if tokens[0] == "torchrun":  # the same program as the console script, without relying on PATH
        return [sys.executable, "-m", "torch.distributed.run", *tokens[1:]]
    assert tokens[0] == "python", tokens
    return [sys.executable, *tokens[1:]]


def chain(args: list[str]) -> str:
    """Commands of one tool (train.py and torchrun count as one) run in README order; different tools may overlap.

    So a command may depend on the first command's run and on earlier commands of its own tool, never on another
    tool's: each tool writes its own paths, and what the others read of the first run is only read."""
    return "train" if "train.py" in args else args[args.index("-m") + 1]


def test_readme_commands_run_as_printed(tmp_path, cache_dir):
    (tmp_path / "train.py").symlink_to(REPO / "train.py")  # the checkout a user runs the README in
    (tmp_path / "conf").symlink_to(REPO / "conf")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # two commands share the two cores
    has_baseline = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", "3f6f79b^{commit}"], capture_output=True).returncode == 0
    todo = []
    for command, tokens in readme_commands():
        extra = COMMANDS[command]
        if isinstance(extra, str) or (not has_baseline and "baseline=" in command):
            continue
        for old, new in SUBSTITUTE.items():
            tokens = [t.replace(old, new) for t in tokens]
        todo.append((command, argv(tokens) + extra))

    def run(command: str, args: list[str]) -> subprocess.CompletedProcess:
        t0 = time.time()
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        print(f"{time.time() - t0:5.1f}s  {command}")
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    # The first command (the tiny run every later one reads) runs alone; then each tool's commands run in README
    # order, two tools at a time (the commands are mostly interpreter start-up, one core each).
    ran = [(todo[0][0], run(*todo[0]))]
    chains: dict[str, list] = {}
    for command, args in todo[1:]:
        chains.setdefault(chain(args), []).append((command, args))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(lambda c: [(command, run(command, args)) for command, args in c], c) for c in chains.values()]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                pool.shutdown(cancel_futures=True)  # the chains not started yet; the running one finishes its command
                raise f.exception()
        for f in futures:
            ran += f.result()
    out = {c: p.stdout for c, p in ran}
    runs = tmp_path / "runs"
    assert (runs / "tiny" / "checkpoints" / "step-000004").is_dir() and (runs / "tiny-branch" / "checkpoints" / "step-000004").is_dir()
    assert {p.name for p in (runs / "tiny-multirun").iterdir()} >= {"0", "1", "2"}
    assert "2 process(es)" in (runs / "tiny-ddp" / "train.log").read_text()
    assert "every parameter matches its schedule" in out["python -m sparse_lm.inspect runs/tiny"]
    assert "----- sample 2 (seed 0) -----" in out[next(c for c in out if "num_samples=3" in c)]
    import json

    summary = json.loads((runs / "tiny" / "circuits" / "step-000004" / "summary.json").read_text())
    assert len(summary["tasks"]) + len(summary["unusable_with_tokenizer"]) == 20  # all 20 tasks, each listed
    control = json.loads((runs / "tiny" / "circuits" / "control" / "summary.json").read_text())
    assert [t["task"] for t in control["tasks"]] == ["bracket_counting"]
    assert (runs / "tiny" / "circuits" / "battery" / "dict_key_quote.json").is_file()
    assert "max_steps" in out["python train.py --cfg job"]
    assert (runs / "tiny" / "plateaus" / "step-000004" / "plateaus.json").is_file()
    assert (runs / "tiny-reference" / "beeg_config.json").is_file() and (runs / "tiny-back" / "model.pt").is_file()
    frontier = json.loads((runs / "frontier-cpu" / "frontier.json").read_text())
    assert [r["run"] for r in frontier["runs"]] == ["d128-d0.25-s0", "d128-dense-4-s0"]
    assert all(r["val_loss"] is not None and r["battery"] for r in frontier["runs"])
    assert "2 of 2 runs done, 0 to train" in out["python -m sparse_lm.frontier frontier=cpu launcher=submitit_local"]
    if not has_baseline:
        pytest.skip("git history without 3f6f79b (a shallow clone): the versus command was not run")
