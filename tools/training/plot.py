"""`align plot RUN`: a run's curves from its metrics.jsonl (the one record of a run; nothing else is read): loss
(raw, faint, and smoothed), learning rate, gradient norm and throughput per stage, and evaluation metrics when the
run logged any."""

import json
import math
from pathlib import Path

from align.constants import METRICS
from align.errors import AlignError

SMOOTHING = 0.9  # exponential moving average of the loss, as TensorBoard's slider at 0.9


def read_metrics(run: Path) -> list[dict]:
    """The step records of a run folder's metrics.jsonl (a torn line is skipped)."""
    path = Path(run) / METRICS if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise AlignError(f"{run} has no {METRICS}: give a run folder (align train --output)")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "stage" in record and "step" in record:
            records.append(record)
    if not records:
        raise AlignError(f"{path} holds no step yet")
    return records


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """The exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, average, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(float("nan"))
            continue
        n += 1
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** n))
    return out


def plot_run(run: Path, out: Path | None = None) -> Path:
    """Draw the run's curves into a PNG (`RUN/curves.png` unless `out`); its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or used
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    evals = sorted({k for r in records for k in r.get("eval", {}) if isinstance(r.get("eval"), dict)})
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
              ("samples_per_second", "samples/s")] + [(f"eval:{k}", k) for k in evals]
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), sharex=True, squeeze=False)
    offset = 0
    for colour, stage in enumerate(stages):
        rows = [r for r in records if r["stage"] == stage]
        x = [offset + r["step"] for r in rows]
        for axis, (key, _) in zip(axes[:, 0], panels):
            if key.startswith("eval:"):
                points = [(offset + r["step"], r["eval"][key[5:]]) for r in rows
                          if isinstance(r.get("eval"), dict) and key[5:] in r["eval"]]
                if points:
                    axis.plot(*zip(*points), "o-", color=f"C{colour}", label=stage)
                continue
            y = [float(r.get(key) if r.get(key) is not None else "nan") for r in rows]
            if key == "loss":
                axis.plot(x, y, color=f"C{colour}", alpha=0.25, linewidth=1)
                axis.plot(x, smoothed(y), color=f"C{colour}", label=stage)
            else:
                axis.plot(x, y, color=f"C{colour}", label=stage)
        offset += max(r["step"] for r in rows)
        if colour < len(stages) - 1:
            for axis in axes[:, 0]:
                axis.axvline(offset + 0.5, color="grey", linewidth=0.5, linestyle=":")
    for axis, (_, title) in zip(axes[:, 0], panels):
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right")
    axes[0, 0].set_title(f"{Path(run).name}: raw loss faint, smoothed ({SMOOTHING}) solid")
    axes[-1, 0].set_xlabel("optimizer step (stages one after another)")
    figure.tight_layout()
    target = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent) / "curves.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
