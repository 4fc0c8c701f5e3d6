"""`align bench transfer`: does a projector carried over from another LLM warm-start a new one? On an `align demo`
workspace, a second tiny LLM unlike demo-tiny (LLaMA architecture, SentencePiece vocabulary, Vicuna's format,
another hidden size), taught the same language, learns its projector in the chat stage twice: from scratch, and from
demo-tiny's chat adapter carried over by `align transfer`. The held-out accuracy against steps of both, and the steps
each needs to reach the from-scratch run's final accuracy."""

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from align.backbones.llm import cpu_accelerator_without_gpu
from align.backbones.registry import get_backbone
from align.constants import ADAPTER_DIR
from align.errors import AlignError
from align.tools.demo.demo import HELD_OUT_PER_CONTENT, TINY_RECIPE, teach
from align.tools.demo.demo_curve import first_reaching, learning_curve
from align.tools.demo.demo_models import build_demo_llama, build_demo_sentencepiece
from align.tools.demo.demo_world import every_content
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.runtime import child_environment
from align.tools.transfer.transfer import transfer_adapter

SECOND = "demo-tiny-llama"
EVAL_EVERY = 10
# Both runs train the chat stage alone, from the same schedule: what differs is only where the projector starts.
LR = {"init_lr": 1.0e-2, "min_lr": 1.0e-3, "warmup_lr": 1.0e-3, "warmup_steps": 4}


def stage_recipe(folder: Path, init_from: Path | None) -> Path:
    """The demo recipe's chat stage for the second LLM, asked the held-out pictures every EVAL_EVERY steps."""
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    chat = next(stage for stage in recipe["stages"] if stage["name"] == "chat")
    chat.update(init_from=str(init_from) if init_from else None, lr=LR, max_length=160)
    chat["data"] = [{"manifest": "../data/chat.jsonl"}]
    chat["eval"].update(every=EVAL_EVERY, at_start=True)
    chat["eval"]["benchmark"]["files"] = {"data": "../data/held_out_questions.jsonl"}
    recipe.update(backbone={"name": SECOND, "model": "llm"}, features="../features", stages=[chat])
    path = folder / ("transferred.yaml" if init_from else "scratch.yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(recipe: Path, out: Path, seed: int, quiet: bool) -> None:
    """`align train RECIPE --output OUT` in its own process, as a user runs it."""
    command = [sys.executable, "-m", "align", "train", str(recipe), "--output", str(out), "--overwrite",
               "--set", f"runtime.seed={seed}"]
    result = subprocess.run(command, env=child_environment(), capture_output=quiet, text=True)
    if result.returncode != 0:
        raise AlignError(f"`align train {recipe}` failed (exit {result.returncode}) {(result.stderr or '')[-300:]}")


def bench_transfer(workspace: Path, *, seed: int = 0, out_dir: Path = RESULTS_DIR, quiet: bool = False,
                   say: Callable[[str], None] = print) -> tuple[dict, Path]:
    """Both runs on an `align demo` workspace; the JSON result (its PNG beside it) and where it was written."""
    cpu_accelerator_without_gpu()  # before DeepSpeed guesses (and says so on stdout, where --json writes)
    workspace = Path(workspace).resolve()
    source = workspace / "runs" / "chat" / ADAPTER_DIR
    if not source.is_dir() or not (workspace / "llm").is_dir():
        raise AlignError(f"{workspace} is not an `align demo` workspace with its tiny LLM "
                         f"(run `align demo --backbone demo-tiny --out {workspace}` first)")
    folder = workspace / "transfer"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    spec = get_backbone(SECOND)
    say(f"[1/4] building '{SECOND}' (LLaMA, SentencePiece, hidden {spec.hidden_size}) and teaching it the language")
    build_demo_sentencepiece(folder / "llm", spec.vocab_size)
    teach(build_demo_llama(spec, seed), spec, folder / "llm", seed, say, quiet)
    say("[2/4] align transfer: demo-tiny's chat adapter → the new LLM")
    origin = transfer_adapter(source, SECOND, folder / "transferred-adapter", corpus=workspace / "data" / "chat.jsonl",
                              source_model=workspace / "llm", target_model=folder / "llm", say=say)
    truth = every_content() * HELD_OUT_PER_CONTENT  # the held-out pictures, in the demo's order
    curves = {}
    for step, (name, init) in enumerate((("scratch", None), ("transferred", folder / "transferred-adapter")), start=3):
        say(f"[{step}/4] training the chat stage {'from scratch' if init is None else 'from the transferred adapter'}")
        train(stage_recipe(folder, init), folder / f"runs-{name}", seed, quiet)
        curves[name] = learning_curve(folder / f"runs-{name}", ["chat"], truth)
    target = curves["scratch"][-1]["both"]
    reached = {name: first_reaching(points, target) for name, points in curves.items()}
    result = {
        "bench": "transfer", "device": device_name(torch.device("cpu")), "workspace": str(workspace),
        "command": f"align bench transfer --workspace {workspace}", "source": "demo-tiny", "target": SECOND,
        "converter": origin["fit"], "target_accuracy": target,
        "steps_to_target": {name: point["step"] if point else None for name, point in reached.items()},
        "accuracy_at_start": {name: points[0]["both"] for name, points in curves.items()},
        "final_accuracy": {name: points[-1]["both"] for name, points in curves.items()},
        "curves": {name: [{"step": p["step"], "both": p["both"]} for p in points] for name, points in curves.items()},
    }
    result, path = write_result(result, out_dir, "transfer")
    plot(curves, target, path.with_suffix(".png"))
    return result, path


def plot(curves: dict[str, list[dict]], target: float, out: Path) -> Path:
    """Held-out accuracy against steps, from scratch and transferred, with the target line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or used
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, points in curves.items():
        axis.plot([p["step"] for p in points], [100 * p["both"] for p in points], "-o", markersize=3, label=name)
    axis.axhline(100 * target, color="grey", linestyle=":", label="from scratch, final")
    axis.set(xlabel="training step (chat stage)", ylabel="held-out accuracy, colour and shape (%)", ylim=(0, 100),
             title=f"align bench transfer: demo-tiny → {SECOND}")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
