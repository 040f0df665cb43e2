import pytest
import torch

from sparse_lm.errors import UserError
from sparse_lm import checkpoint


def tiny_state():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), betas=(0.9, 0.95), eps=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def save(root, step, model, opt, tokenizer, keep_last=3):
    return checkpoint.save(root, step, model, opt, {"tokenizer_hash": "abc"}, "name: x\n", tokenizer, keep_last)


@pytest.fixture
def tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    return path


def test_round_trip_loads_with_weights_only(tmp_path, tokenizer):
    model, opt = tiny_state()
    path = save(tmp_path / "ckpts", 7, model, opt, tokenizer)
    assert path.name == "step-000007" and (tmp_path / "ckpts" / "latest").resolve() == path
    loaded = checkpoint.load(path)
    assert loaded["state"]["step"] == 7 and torch.equal(loaded["model"]["weight"], model.weight)
    opt2 = torch.optim.Adam(model.parameters(), betas=(0.9, 0.95), eps=0.1)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    for f in ("model.pt", "optimizer.pt", "rng.pt"):
        torch.load(path / f, weights_only=True)  # raises if anything but tensors and plain containers is inside


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint_as_latest(tmp_path, tokenizer, monkeypatch):
    model, opt = tiny_state()
    root = tmp_path / "ckpts"
    first = save(root, 1, model, opt, tokenizer)
    real_save = torch.save

    def dies_on_optimizer(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(10)  # half a file on disk, then the process "dies"
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_optimizer)
    with pytest.raises(KeyboardInterrupt):
        save(root, 2, model, opt, tokenizer)
    monkeypatch.undo()
    assert checkpoint.latest(root) == first and checkpoint.resolve(tmp_path / "ckpts") == first
    assert [p.name for p in checkpoint.step_dirs(root)] == ["step-000001"]
    assert checkpoint.load(first)["state"]["step"] == 1


def test_a_dangling_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, tokenizer):
    model, opt = tiny_state()
    root = tmp_path / "ckpts"
    save(root, 1, model, opt, tokenizer)
    second = save(root, 2, model, opt, tokenizer)
    (root / "latest").unlink()
    (root / "latest").symlink_to("step-000009")  # e.g. a crash between the rename and the link swap
    assert checkpoint.latest(root) == second


def test_keep_last_and_stale_temporaries_are_cleaned(tmp_path, tokenizer):
    model, opt = tiny_state()
    root = tmp_path / "ckpts"
    root.mkdir()
    (root / ".tmp-step-000004-x").mkdir()
    for step in range(1, 6):
        save(root, step, model, opt, tokenizer, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000005"]


def test_resolve_accepts_run_dirs_and_names_what_is_missing(tmp_path, tokenizer):
    model, opt = tiny_state()
    path = save(tmp_path / "run" / "checkpoints", 3, model, opt, tokenizer)
    assert checkpoint.resolve(tmp_path / "run") == path == checkpoint.resolve(path)
    with pytest.raises(UserError, match="no checkpoint here"):
        checkpoint.resolve(tmp_path / "elsewhere")
