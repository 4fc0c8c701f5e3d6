"""The demo's learning curve: held-out accuracy (colour and shape, colour, shape) against optimizer steps and
training time, from the answers the recipe's in-training evaluation saved at each step, drawn as a PNG."""

import json
from pathlib import Path

from align.constants import METRICS
from align.tools.demo.demo_world import COLOURS, SHAPES, Content, named, names_correctly
from align.tools.training.plot import read_metrics


def answer_accuracy(answers: list[str], truth: list[Content]) -> dict[str, float]:
    """The share of answers naming colour and shape right (and nothing else), the colour alone, the shape alone."""
    def share(right) -> float:
        return round(sum(map(right, answers, truth)) / len(truth), 4)

    return {"both": share(names_correctly),
            "colour": share(lambda answer, content: named(answer, COLOURS) == {content.colour}),
            "shape": share(lambda answer, content: named(answer, SHAPES) == {content.shape})}


def answers_of(results: Path) -> list[str]:
    """The answers of an align eval results file, in the benchmark's order."""
    return [str(record["answer"]) for record in json.loads(results.read_text(encoding="utf-8"))]


def learning_curve(runs: Path, stages: list[str], truth: list[Content]) -> list[dict]:
    """One point per evaluation of the run (step 0: the first stage's, before its first step): global step, stage,
    accuracy, and the seconds of training (optimizer steps only, from metrics.jsonl) up to it."""
    points = []
    records = read_metrics(runs / METRICS)
    recipe = json.loads((runs / "recipe.json").read_text())
    batch = {stage["name"]: stage["global_batch_size"] for stage in recipe["stages"]}
    offset, elapsed, seconds_at = {}, 0.0, {0: 0.0}
    for record in records:
        offset.setdefault(record["stage"], len(seconds_at) - 1)
        elapsed += batch[record["stage"]] / record["samples_per_second"]
        seconds_at[len(seconds_at)] = elapsed
    for stage in stages:
        start = offset[stage]
        for folder in sorted((runs / stage / "eval").glob("step*")):
            step = start + int(folder.name.removeprefix("step"))
            points.append({"step": step, "stage": "untrained" if step == 0 else stage,
                           **answer_accuracy(answers_of(folder / "results.json"), truth),
                           "train_seconds": round(seconds_at[step], 1)})
    return points


def first_reaching(points: list[dict], share: float) -> dict | None:
    """The first point whose colour-and-shape accuracy reaches `share`."""
    return next((point for point in points if point["both"] >= share), None)


def plot_curve(points: list[dict], out: Path, title: str) -> Path:
    """Held-out accuracy against steps (colour and shape, colour, shape), the 80 % line and where the last stage
    began; the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or used
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    steps = [p["step"] for p in points]
    for key, style, label in (("both", "-o", "colour and shape"), ("colour", "--", "colour"), ("shape", ":", "shape")):
        axis.plot(steps, [100 * p[key] for p in points], style, label=label)
    earlier = [p["step"] for p in points if p["stage"] not in ("untrained", points[-1]["stage"])]
    if earlier:
        axis.axvline(max(earlier), color="grey", linewidth=0.6)
    axis.axhline(80, color="red", linewidth=0.6, linestyle="--")
    axis.set_title(f"{points[-1]['step']} steps, {points[-1]['train_seconds'] / 60:.1f} min of training", fontsize=10)
    axis.set_xlabel("optimizer steps")
    axis.set_ylabel("held-out pictures right (%)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
