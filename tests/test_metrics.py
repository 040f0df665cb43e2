import json

import pytest

from sparse_lm.metrics import RunLogger, plot_curves, read_metrics


def test_a_torn_last_line_is_ignored_but_a_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


def test_resuming_drops_rows_written_after_the_checkpoint(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1, "density": 1.0} for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    logger = RunLogger(tmp_path, start_step=5, max_steps=10, enabled=True)
    logger.write({"step": 6, "loss": 0.2, "lr": 0.1, "density": 1.0}, {"train/loss": 0.2})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "curves.png").stat().st_size > 5_000 and list((tmp_path / "tb").iterdir())


def test_curves_need_no_validation_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 0.1, "density": 0.5}) + "\n")
    plot_curves(path, tmp_path / "c.png")
    assert (tmp_path / "c.png").is_file()
