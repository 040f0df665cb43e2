"""Circuit pruning (docs/method.md §5): tasks, straight-through masks, mean ablation, bisection, edges, and a planted circuit."""

import json
import re

import pytest
import torch

from sparse_lm.circuits.edges import circuit_edges, count_by_kind
from sparse_lm.circuits.nodes import Ablation, NodeSpace, ablated
from sparse_lm.circuits.pruning import site_means, smallest_passing, straight_through
from sparse_lm.circuits.search import find_circuit
from sparse_lm.config import Activation, DataConfig, EdgeConventions, ModelConfig, PruneConfig
from sparse_lm.hooks import record
from sparse_lm.model import GPT
from sparse_lm.circuits.tasks import NAMES, TASKS, TaskData, TaskTokenError, _pool, build, generate

# ---------------------------------------------------------------- a model with a planted circuit

A, B, a, b = 0, 1, 6, 7  # context tokens that decide the answer, and the two answers
R_IN, R_OUT, NEURON = 0, 1, 0  # residual channel read, residual channel written, the deciding neuron


def planted_model() -> GPT:
    """One layer. Path: token A/B → residual channel 0 → neuron 0 (ReLU, fires for A) → residual channel 1 → a vs b.

    Distractors: random residual channels 2–5 on every token, neuron 1 that fires for B but writes channel 6,
    neurons 2–3 that read the noise channels and write channels 7–8, and an attention block that does nothing.
    """
    cfg = ModelConfig(vocab_size=8, ctx_len=8, n_layer=1, d_model=16, d_head=16, d_mlp=8, activation=Activation.relu,
                      attn_sink=False, bigram=False, topk_sites=[])
    model = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.blocks[0].norm1.weight.fill_(1)
        model.blocks[0].norm2.weight.fill_(1)
        model.norm_f.weight.fill_(1)
        model.wte.weight[:, 2:6] = 0.3 * torch.randn(8, 4, generator=g)
        # A and B differ only in channel 0: otherwise the RMS norms would carry which one it was (through their
        # scale), a real second path that a calibrated readout can pick up.
        model.wte.weight[B, 2:6] = model.wte.weight[A, 2:6]
        model.wte.weight[A, R_IN], model.wte.weight[B, R_IN] = 1.0, -1.0
        model.wte.weight[:, R_OUT] = -1.0  # the answer channel starts below zero: b unless the neuron fires
        fc, proj = model.blocks[0].mlp.c_fc.weight, model.blocks[0].mlp.c_proj.weight
        fc[NEURON, R_IN], proj[R_OUT, NEURON] = 1.0, 10.0
        fc[1, R_IN], proj[6, 1] = -1.0, 0.5
        fc[2, 2], proj[7, 2] = 1.0, 0.5
        fc[3, 3], proj[8, 3] = 1.0, 0.5
        # Large enough that the raw logits decide (raw loss well under the target): no calibration needed.
        model.lm_head.weight[a, R_OUT], model.lm_head.weight[b, R_OUT] = 8.0, -8.0
    return model.eval().requires_grad_(False)


def planted_task(n: int, seed: int, prefix: int = 5) -> TaskData:
    """A or B after `prefix` noise tokens (another length: another template family)."""
    g = torch.Generator().manual_seed(seed)
    length = prefix + 1
    prefix = torch.randint(2, 6, (n, prefix), generator=g)
    tokens = torch.cat([torch.cat([prefix, torch.full((n, 1), A)], 1), torch.cat([prefix, torch.full((n, 1), B)], 1)])
    return TaskData("planted", (a, b), ("a", "b"), tokens, torch.full((2 * n,), length))


def test_pruning_recovers_exactly_the_planted_circuit_and_its_edges():
    model = planted_model()
    space = NodeSpace.of(model)
    pretraining = torch.randint(0, 6, (64, 8), generator=torch.Generator().manual_seed(1))
    means = site_means(model, space.sites, pretraining)
    cfg = PruneConfig(checkpoint="-", steps=300, n_calib=64, batch_pairs=16, seed=0)
    res = find_circuit(model, Ablation("mean", means), planted_task(256, 2), planted_task(100, 3), cfg, log=lambda _: None)
    assert res.solved and res.circuit.loss <= 0.15 and res.circuit.loss == res.circuit.raw_loss  # judged raw by default
    assert res.kept == {"0.mlp.in": [R_IN], "0.mlp.neuron": [NEURON], "0.mlp.out": [R_OUT]}
    assert res.nodes == 3 and res.without.loss > 0.15  # the full model without these three fails
    weights = model.state_dict()
    edges = circuit_edges(weights, 1, 16, res.kept, [2, 3, 4, 5, A, B], (a, b), EdgeConventions())
    assert count_by_kind(edges) == {"mlp.in": 1, "mlp.out": 1, "embedding": 2, "unembedding": 2, "total": 6}
    bare = EdgeConventions(qk_pairs=False, embedding=False, unembedding=False, residual=True)
    assert count_by_kind(circuit_edges(weights, 1, 16, res.kept, [A, B], (a, b), bare)) == {"mlp.in": 1, "mlp.out": 1, "total": 2}


# ---------------------------------------------------------------- the pieces on their own


def test_straight_through_steps_forward_and_uses_the_sigmoid_slope_backward():
    tau = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    keep = straight_through(tau)
    assert keep.tolist() == [0.0, 1.0, 1.0]
    keep.sum().backward()
    s = torch.sigmoid(tau.detach())
    assert torch.allclose(tau.grad, s * (1 - s))


def test_mean_ablation_replaces_exactly_the_dropped_channels():
    model = planted_model()
    space = NodeSpace.of(model)
    idx = planted_task(4, 0).tokens
    means = {site: torch.arange(dim, dtype=torch.float32) + 100 for site, dim in zip(space.sites, space.dims)}
    keep = torch.ones(space.total)
    neuron_offset = sum(space.dims[: space.sites.index("0.mlp.neuron")])
    keep[neuron_offset + 2] = 0
    with record(model, ["0.mlp.neuron"]) as clean:
        model(idx)
    with ablated(model, space, keep, Ablation("mean", means)), record(model, ["0.mlp.neuron"]) as acts:
        model(idx)
    got, ref = acts["0.mlp.neuron"], clean["0.mlp.neuron"]
    assert (got[..., 2] == 102).all()
    assert torch.equal(got[..., [0, 1, 3, 4, 5, 6, 7]], ref[..., [0, 1, 3, 4, 5, 6, 7]])


def test_bisection_finds_the_smallest_passing_size():
    calls = []

    def passes(n):
        calls.append(n)
        return n >= 37

    assert smallest_passing(passes, 1000) == 37 and len(calls) <= 13
    calls.clear()
    assert smallest_passing(passes, 1000, hint=40) == 37 and len(calls) <= 9  # a good hint saves evaluations
    assert smallest_passing(passes, 1000, hint=20) == 37
    assert smallest_passing(lambda n: n >= 0, 50) == 0
    assert smallest_passing(lambda n: False, 50) is None


def test_edges_count_qk_pairs_and_residual_links_when_asked():
    model = planted_model()
    kept = {"0.attn.q": [3, 4], "0.attn.k": [4, 9], "0.attn.out": [5], "0.mlp.in": [5], "0.mlp.neuron": [0], "0.mlp.out": [1]}
    conv = EdgeConventions(qk_pairs=True, embedding=False, unembedding=False, residual=True)
    counts = count_by_kind(circuit_edges(model.state_dict(), 1, 16, kept, [A], (a, b), conv))
    assert counts["attn.qk"] == 1  # q[4]·k[4]; q[3] and k[9] have no partner
    assert counts["residual"] == 1  # attn.out[5] → mlp.in[5]
    assert "mlp.in" not in counts  # c_fc[0, 5] is zero: no edge however both ends are kept


# ---------------------------------------------------------------- the task suite


@pytest.fixture(scope="module")
def stdlib_tokenizer(cache_dir):
    from sparse_lm.data.cache import prepare
    from sparse_lm.data.tokenizer import load_tokenizer

    return load_tokenizer(prepare(DataConfig(cache_dir=str(cache_dir))).tokenizer_path)


def test_every_task_poses_single_token_answers_with_the_default_tokenizer(stdlib_tokenizer):
    assert len(TASKS) == 20 and all(len(families) >= 3 for families in TASKS.values())
    for task in TASKS:
        splits = [build(task, stdlib_tokenizer, split, n) for split, n in (("train", 1000), ("test", 200), ("unseen", 200))]
        assert [d.n_pairs for d in splits] == [1000, 200, 200], task
        assert len({d.answers for d in splits}) == 1 and splits[0].answers[0] != splits[0].answers[1], task
        for d in splits:  # the two sides of a pair share their last token: the answer is not readable off it alone
            n = d.n_pairs
            last = d.tokens[torch.arange(2 * n), d.lengths - 1]
            assert torch.equal(last[:n], last[n:]), task


def test_a_task_longer_than_the_models_context_is_refused_naming_it(stdlib_tokenizer):
    with pytest.raises(TaskTokenError, match=r"task first_arg_recall: its unseen contexts run to \d+ tokens.*model.ctx_len=20"):
        build("first_arg_recall", stdlib_tokenizer, "unseen", 50, max_len=20)
    assert build("first_arg_recall", stdlib_tokenizer, "unseen", 50, max_len=128).n_pairs == 50


def test_the_unseen_family_is_used_by_the_unseen_split_only(monkeypatch):
    import sparse_lm.circuits.tasks as tasks

    def refuse(_f):
        raise AssertionError("family used where it must not be")

    for task, families in TASKS.items():
        monkeypatch.setitem(tasks.TASKS, task, (*families[:-1], refuse))
        assert len(generate(task, "train", 30)) == 30 and len(generate(task, "test", 30)) == 30
        monkeypatch.setitem(tasks.TASKS, task, tuple(refuse for _ in families[:-1]) + (families[-1],))
        assert len(generate(task, "unseen", 30)) == 30
        monkeypatch.setitem(tasks.TASKS, task, families)


def test_held_out_pairs_use_names_never_seen_in_training():
    train_names, test_names = set(_pool(NAMES, "train")), set(_pool(NAMES, "test"))
    assert not train_names & test_names
    for task, split in (("set_or_string", "test"), ("list_or_dict_use", "unseen"), ("loop_unpacking", "test"), ("loop_unpacking", "unseen")):
        test_text = " ".join(ctx for pair in generate(task, split, 200) for ctx, _ in pair)
        words = set(test_text.replace("\n", " ").replace("(", " ").replace(")", " ").split())
        assert not (words & train_names), task
    assert generate("bracket_counting", "train", 50, seed=1) == generate("bracket_counting", "train", 50, seed=1)
    for task in TASKS:  # no held-out context is a training context; no context is an A side and a B side at once
        train = {c for pair in generate(task, "train", 1000) for c, _ in pair}
        for split in ("train", "test", "unseen"):
            pairs = generate(task, split, 400)
            a_sides, b_sides = {a for (a, _), _ in pairs}, {b for _, (b, _) in pairs}
            assert not a_sides & b_sides, (task, split)
            assert split == "train" or not train & (a_sides | b_sides), (task, split)


def test_a_tokenizer_that_splits_an_answer_is_refused_naming_the_task_and_answers(corpus, tmp_path):
    from sparse_lm.data.tokenizer import train_tokenizer

    bytes_only = train_tokenizer([p.read_text() for p in sorted(corpus.glob("*.py"))[:5]], 257)  # no merges
    with pytest.raises(TaskTokenError, match=r"task paren_depth: answers must be one token per side and differ, got A=\['\)'\] B=\['\)'\]"):
        build("paren_depth", bytes_only, "train", 50)  # '))' and ')' both begin with ')'
    with pytest.raises(TaskTokenError, match="task bracket_counting"):
        build("bracket_counting", bytes_only, "train", 50)


def test_prune_command_writes_circuits_pictures_and_a_summary(tiny_run, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "circuits"
    cmd = [sys.executable, "-m", "sparse_lm.prune", str(tiny_run), "tasks=[dict_or_list_literal,single_double_quote]",
           f"out_dir={out}", "steps=20", "n_train=64", "n_test=32", "n_calib=32", "target=0.7", "controls=[random_init]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] dict_or_list_literal" in proc.stdout and "control random_init:" in proc.stdout and "geometric mean" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [t["task"] for t in summary["tasks"]] == ["dict_or_list_literal", "single_double_quote"]
    for task in summary["with_circuit"]:
        res = json.loads((out / f"{task}.json").read_text())
        c = res["circuit"]
        assert c["edges"]["total"] == len(res["edge_list"]) and c["nodes"] == sum(len(v) for v in c["kept"].values())
        assert set(res["controls"]) == {"random_init"}
        if c["nodes"] == 0:  # at this lenient target the whole-ablated model can pass: nothing to draw
            assert not (out / f"{task}.png").exists()
            continue
        assert (out / f"{task}.png").stat().st_size > 5_000
        page = (out / f"{task}.html").read_text()
        assert "<svg" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert all(set(t["controls"]) == {"random_init"} for t in summary["tasks"])
    assert (tiny_run / "checkpoints" / "step-000040" / "site_stats-64.pt").exists()  # cached for the next run

    # Another invocation never replaces these results silently: it is refused before any work, in one line.
    before = (out / "summary.json").read_text()
    again = subprocess.run(cmd[:4] + [f"out_dir={out}", "tasks=[]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds the results of an earlier prune" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (out / "summary.json").read_text() == before
    replaced = subprocess.run(cmd[:4] + [f"out_dir={out}", "tasks=[]", "overwrite=true"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0 and json.loads((out / "summary.json").read_text())["tasks"] == []
    assert not (out / "dict_or_list_literal.json").exists() and not (out / "single_double_quote.json").exists()
    zero = subprocess.run(cmd[:4] + [f"out_dir={tmp_path / 'other'}", "n_test=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert zero.returncode == 1 and "n_test=0 is out of range" in zero.stderr and "unusable" not in zero.stdout


def test_mask_training_is_deterministic_given_a_seed():
    from sparse_lm.circuits.pruning import train_masks

    model = planted_model()
    space = NodeSpace.of(model)
    means = site_means(model, space.sites, torch.randint(0, 6, (16, 8), generator=torch.Generator().manual_seed(1)))
    task = planted_task(64, 2)
    runs = [train_masks(model, space, Ablation("mean", means), task, PruneConfig(checkpoint="-", steps=15), s) for s in (4, 4, 5)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_calibration_rescales_and_shifts_but_never_flips():
    from sparse_lm.circuits.pruning import calibrate, side_losses

    right = torch.cat([torch.full((50,), 0.3), torch.full((50,), 0.1)])  # a sides above b sides, both positive
    scale, shift = calibrate(right)
    assert scale > 1 and side_losses(right, scale, shift).mean() < 0.1 < side_losses(right).mean()
    wrong = -right  # prefers the wrong answer everywhere
    scale, shift = calibrate(wrong)
    assert scale > 0 and side_losses(wrong, scale, shift).mean() > 0.69


def test_calibration_does_not_depend_on_a_common_offset():
    from sparse_lm.circuits.pruning import calibrate, side_losses

    g = torch.Generator().manual_seed(0)
    delta = torch.cat([0.1 + 0.03 * torch.randn(100, generator=g), -0.1 + 0.03 * torch.randn(100, generator=g)])
    losses = [side_losses(delta + c, *calibrate(delta + c)).mean().item() for c in (0.0, 3.0, 10.0)]
    assert losses[0] < 0.02 and max(losses) - min(losses) < 1e-3



def test_only_an_earlier_prunes_own_files_count_as_its_results(tmp_path):
    from sparse_lm.circuits.report import earlier_results, publish

    (tmp_path / "curves.png").write_bytes(b"x")  # a run directory's own files are not a prune's results
    assert earlier_results(tmp_path) == []
    (tmp_path / "summary.json").write_text("{}")  # results written before run.json listed its files
    (tmp_path / "random_init").mkdir()
    (tmp_path / "random_init" / "bracket_counting.png").write_bytes(b"x")
    assert sorted(earlier_results(tmp_path)) == ["random_init/bracket_counting.png", "summary.json"]
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "run.json").write_text(json.dumps({"files": ["run.json", "summary.json"]}))
    (staging / "summary.json").write_text('{"new": 1}')
    publish(staging, tmp_path, earlier_results(tmp_path))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"new": 1} and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "random_init" / "bracket_counting.png").exists()  # the earlier result it replaces is gone
    assert earlier_results(tmp_path) == ["run.json", "summary.json"]  # now listed by the manifest


# ---------------------------------------------------------------- the faithfulness battery


def planted_subject(model, label="trained model"):
    from sparse_lm.circuits.battery import Subject

    space = NodeSpace.of(model)
    source = torch.randint(0, 6, (64, 8), generator=torch.Generator().manual_seed(1))
    means = site_means(model, space.sites, source)
    return Subject(label, model, means, source)


def battery(model, subjects, **overrides):
    from sparse_lm.circuits.battery import run_task

    cfg = PruneConfig(checkpoint="-", steps=300, n_calib=64, batch_pairs=16, seed=0, **overrides)
    return run_task(planted_subject(model), subjects, planted_task(256, 2), planted_task(100, 3), planted_task(100, 4, prefix=7), cfg,
                    log=lambda _: None)


def random_planted_shape(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(planted_model().cfg).eval().requires_grad_(False)


def test_the_planted_circuit_is_trusted_and_every_control_fails():
    from sparse_lm.circuits.controls import redrawn_model

    model = planted_model()
    controls = {"random_init": planted_subject(random_planted_shape(0), "random_init"),
                "redrawn": planted_subject(redrawn_model(model, 0), "redrawn")}
    res = battery(model, controls, controls="all")
    redrawn = controls["redrawn"].model
    for (name, p), q in zip(model.named_parameters(), redrawn.parameters()):  # the same mask, other values
        assert torch.equal(p != 0, q != 0), name
    assert not torch.equal(model.blocks[0].mlp.c_fc.weight, redrawn.blocks[0].mlp.c_fc.weight)
    assert res.circuit.kept == {"0.mlp.in": [R_IN], "0.mlp.neuron": [NEURON], "0.mlp.out": [R_OUT]}
    assert res.checks == {"sufficiency": True, "unseen_family": True, "necessity": True, "frozen_norms": True}
    assert set(res.controls) == {"random_init", "redrawn", "nonsense"} and not any(c.passed for c in res.controls.values())
    assert res.trusted and res.why == []
    partial = battery(model, {}, controls=["nonsense"])  # the same circuit without the whole battery is not trusted
    assert partial.circuit.kept == res.circuit.kept and not partial.trusted
    assert partial.why == ["not run: frozen_norms, random_init, redrawn"]
    assert set(res.ablations) == {"zero", "resample"}


def test_a_random_weight_model_yields_no_trusted_circuit():
    res = battery(random_planted_shape(1), {}, controls=["nonsense"])
    assert not res.trusted and res.why


def test_the_whole_planted_model_fails_the_nonsense_task():
    from sparse_lm.circuits.controls import nonsense
    from sparse_lm.circuits.pruning import Judge
    from sparse_lm.config import Calibration

    model = planted_model()
    subject = planted_subject(model)
    space = NodeSpace.of(model)
    task, calib = planted_task(100, 3), planted_task(64, 2)
    for mode in Calibration:
        real = Judge(model, space, subject.ablation("mean", False, 0), calib, task, mode)(torch.ones(space.total))
        fake = Judge(model, space, subject.ablation("mean", False, 0), nonsense(calib, 0), nonsense(task, 1), mode)(torch.ones(space.total))
        assert real.loss < 0.15 < fake.loss, mode
    flipped = nonsense(task, 1)
    assert torch.equal(flipped.tokens.sort(0).values, task.tokens.sort(0).values)  # the same contexts, relabelled
    assert 0.3 < (flipped.tokens[:100] != task.tokens[:100]).any(1).float().mean() < 0.7


def test_ablation_modes_replace_dropped_channels_as_documented():
    model = planted_model()
    space = NodeSpace.of(model)
    idx = planted_task(4, 0).tokens
    site = "0.mlp.neuron"
    keep = torch.ones(space.total)
    offset = sum(space.dims[: space.sites.index(site)])
    keep[offset + 2] = 0
    means = {s: torch.full((d,), 7.0) for s, d in zip(space.sites, space.dims)}
    source = torch.randint(0, 6, (3, 8), generator=torch.Generator().manual_seed(5))
    with record(model, [site]) as clean_src:
        model(source)
    for mode, expected in (("mean", lambda got: (got == 7).all()), ("zero", lambda got: (got == 0).all()),
                           ("resample", lambda got: any(torch.equal(got[r], clean_src[site][j, :6, 2]) for r in range(len(got)) for j in range(3)))):
        with ablated(model, space, keep, Ablation(mode, means, source)), record(model, [site]) as acts:
            model(idx)
        got = acts[site][..., 2]
        assert expected(got), mode
        assert not torch.equal(got, torch.zeros_like(got)) or mode == "zero"
    # resampled rows are whole contexts from the source, at the same positions
    with ablated(model, space, keep, Ablation("resample", means, source)), record(model, [site]) as acts:
        model(idx)
    for r in range(idx.shape[0]):
        assert any(torch.equal(acts[site][r, :, 2], clean_src[site][j, :6, 2]) for j in range(3))


def test_frozen_norms_divide_by_the_whole_models_scale_on_the_same_input():
    model = planted_model()
    space = NodeSpace.of(model)
    idx = planted_task(4, 0).tokens
    means = {s: torch.zeros(d) for s, d in zip(space.sites, space.dims)}
    keep = torch.ones(space.total)
    # Drop the answer-writing channel: the final norm's input shrinks, which a live norm would partly undo.
    out_offset = sum(space.dims[: space.sites.index("0.mlp.out")])
    keep[out_offset + R_OUT] = 0
    inputs = []  # what reaches the final norm, in call order
    hook = model.norm_f.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        model(idx)  # the whole model: its scale
        with ablated(model, space, keep, Ablation("mean", means, frozen_norms=True)):
            frozen, _ = model(idx)  # a clean pass on the same input (its scales), then the pruned one
        with ablated(model, space, keep, Ablation("mean", means)):
            live, _ = model(idx)
    finally:
        hook.remove()
    x_whole, x_clean, x_frozen, x_live = inputs
    assert torch.equal(x_clean, x_whole) and torch.equal(x_frozen, x_live)  # the same pruned input to the norm ...
    scale = torch.rsqrt(x_whole.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = model.lm_head(x_frozen * scale * model.norm_f.weight)
    assert torch.allclose(frozen, expected, atol=1e-5)  # ... divided by the whole model's scale
    assert not torch.allclose(frozen, live, atol=1e-3)  # where a live norm rescales it


def test_seeds_are_deterministic_and_reported_with_their_overlap():
    runs = [battery(planted_model(), {}, seeds=3) for _ in range(2)]
    assert [c.kept for c in runs[0].seeds] == [c.kept for c in runs[1].seeds] and len(runs[0].seeds) == 3
    assert [c.seed for c in runs[0].seeds] == [0, 1, 2]
    spread = runs[0].seed_spread
    assert spread == runs[1].seed_spread and spread["seeds"] == 3 and 0 <= spread["mean_jaccard"] <= 1


# ---------------------------------------------------------------- the circuit page in a real browser


def test_the_circuit_page_renders_in_one_screen_and_its_node_panel_opens(tmp_path):
    import shutil
    import subprocess

    from sparse_lm.circuits import report
    from sparse_lm.circuits.prune import Results
    from sparse_lm.circuits.pruning import site_stats

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (.ci/run does) to test the circuit pages")
    model = planted_model()
    res = battery(model, {})
    source = planted_subject(model).source
    results = Results("planted", 0, [res], stats=site_stats(model, NodeSpace.of(model).sites, source), tokens=source,
                      decode=lambda t: f"<t{t}>")
    report.write(results, model, PruneConfig(checkpoint="-"), tmp_path)
    page = tmp_path / "planted.html"
    node = "0.mlp.neuron[0]"
    assert res.node_effects[node] > 0.15  # ablating the deciding neuron alone breaks the circuit

    def chromium(*args):
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 10_000  # it renders
    dom = chromium("--dump-dom", "--virtual-time-budget=2000", page.as_uri() + "#node=" + node)
    panel = dom[dom.index('<div id="panel"'):]
    panel = panel[: panel.index("</div>")]
    assert node in panel and "top-activating contexts" in panel and "<mark>" in panel and "loss change" in panel
    assert "display: block" in panel  # the panel is open
    heights = [float(h) for h in re.findall(r'<svg[^>]* height="([\d.]+)"', dom)]
    ys = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', dom)]
    assert heights and max(ys) < heights[0] and heights[0] + 40 < 1000  # every kept layer above the fold
    rows = re.findall(r'text-anchor="end">([^<]+)</text>', dom)
    assert rows == ["tokens", "embedding", "0.mlp.in", "0.mlp.neuron", "0.mlp.out", "unembedding", "answers"]  # no empty rows


def test_judging_raw_fixed_and_per_candidate_on_a_model_whose_logits_are_right_but_small():
    from sparse_lm.circuits.pruning import Judge
    from sparse_lm.config import Calibration

    model = planted_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.02)  # the same preferences, a fiftieth of the logit difference
    subject = planted_subject(model)
    space = NodeSpace.of(model)
    how = subject.ablation("mean", False, 0)
    calib, test = planted_task(64, 2), planted_task(100, 3)
    whole = torch.ones(space.total)
    raw, fixed, per = (Judge(model, space, how, calib, test, mode) for mode in Calibration)
    assert raw(whole).loss > 0.15  # raw: the whole model does not solve it ...
    assert fixed(whole).loss < 0.15 and per(whole).loss < 0.15  # ... after a logit fit it does
    assert raw(whole).raw_loss == fixed(whole).raw_loss == raw(whole).loss
    # `fixed` keeps the whole model's fit for every candidate; `per_candidate` refits: on the circuit with its
    # answer-writing channel dropped, the refit makes more of what is left.
    keep = whole.clone()
    keep[space.offset("0.mlp.out") + R_OUT] = 0
    assert per(keep).loss <= fixed(keep).loss
