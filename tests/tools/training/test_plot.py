"""`align plot`: curves from metrics.jsonl alone, a torn line skipped, the loss smoothed as TensorBoard smooths it."""

import json
import subprocess
import sys

import pytest

from align.tools.training.plot import read_metrics, smoothed


def test_smoothing_is_a_debiased_moving_average():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0 at the start
    values = smoothed([1.0, 3.0])
    assert values[0] == 1.0 and values[1] == pytest.approx((0.9 * 0.1 * 1 + 0.1 * 3) / (1 - 0.81))


def test_plot_draws_a_png_of_every_stage_and_skips_a_torn_line(tmp_path):
    lines = [json.dumps({"stage": s, "step": i + 1, "loss": 2 / (i + 1), "lr": 1e-3, "grad_norm": 1.0,
                         "samples_per_second": 10.0}) for s in ("caption", "chat") for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"stage": "chat", "st')
    assert len(read_metrics(tmp_path)) == 10
    done = subprocess.run([sys.executable, "-m", "align", "plot", str(tmp_path), "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = subprocess.run([sys.executable, "-m", "align", "plot", str(tmp_path / "none")], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.startswith("error: ") and "no metrics.jsonl" in empty.stderr
