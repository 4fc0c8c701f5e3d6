"""The demo's learning curve: held-out accuracy (colour and shape, colour, shape) against optimizer steps and
training time, from the answers the recipe's in-training evaluation saved at each step, drawn as a PNG."""

import json
from pathlib import Path

from align.constants import METRICS
from align.tools.demo.demo_world import COLOURS, SHAPES, Content, names_correctly
from align.tools.training.plot import read_metrics


def accuracy(answers: list[str], truth: list[Content]) -> dict[str, float]:
    """The share of answers naming colour and shape right (and nothing else), the colour alone, the shape alone."""
    def share(right) -> float:
        return round(sum(map(right, answers, truth)) / len(truth), 4)

    def only(words: dict | tuple, word: str):
        return lambda answer: set(answer.lower().replace(".", " ").replace(",", " ").split()) & set(words) == {word}

    return {"both": share(names_correctly),
            "colour": share(lambda answer, content: only(COLOURS, content.colour)(answer)),
            "shape": share(lambda answer, content: only(SHAPES, content.shape)(answer))}


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
                           **accuracy(answers_of(folder / "results.json"), truth),
                           "train_seconds": round(seconds_at[step], 1)})
    return points


def first_reaching(points: list[dict], share: float) -> dict | None:
    """The first point whose colour-and-shape accuracy reaches `share`."""
    return next((point for point in points if point["both"] >= share), None)


def plot_curve(curves: dict[str, list[dict]], out: Path, title: str) -> Path:
    """Held-out accuracy against steps, one panel per backbone (both, colour, shape); the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False, sharey=True)
    for axis, (name, points) in zip(axes[0], curves.items()):
        steps = [p["step"] for p in points]
        for key, style in (("both", "-o"), ("colour", "--"), ("shape", ":")):
            axis.plot(steps, [100 * p[key] for p in points], style, label=key if key != "both" else "colour and shape")
        for stage_start in sorted({p["step"] for p in points if p["stage"] != points[-1]["stage"]})[-1:]:
            if stage_start:
                axis.axvline(stage_start, color="grey", linewidth=0.6)
        axis.axhline(80, color="red", linewidth=0.6, linestyle="--")
        minutes = points[-1]["train_seconds"] / 60
        axis.set_title(f"{name}: {points[-1]['step']} steps, {minutes:.1f} min of training", fontsize=10)
        axis.set_xlabel("optimizer steps")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out pictures right (%)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
