"""A run's output folder: held by one job at a time, refused when it holds another run unless resuming it or told
to overwrite it, and on resume the recipe compared with the one the run started with and metrics.jsonl cut back to
the checkpoint."""

import json
import shutil
from contextlib import ExitStack
from pathlib import Path

from align.constants import METRICS, RECIPE_JSON
from align.errors import AlignError
from align.files import FolderLock, read_json_object, write_atomic
from align.tools.training.recipe import Recipe, stage_by_name


def saved_recipe(output: Path | None, resume: bool) -> Path:
    """The recipe a run in `output` started with, which `--resume` continues when given no recipe."""
    if not resume or output is None:
        raise AlignError("give the recipe to train, or --resume --output RUN to continue a run with its own recipe")
    saved = output / RECIPE_JSON
    if not saved.is_file():
        raise AlignError(f"{output} holds no run to resume ({RECIPE_JSON} is missing); give the recipe")
    return saved


def claim_output(recipe: Recipe, held: ExitStack, resume: bool, overwrite: bool) -> None:
    """Lock the output folder; refuse one that holds a run unless resuming it or told to overwrite it (then the
    recipe's stage folders, metrics and recipe copy go; render caches stay, they are reusable)."""
    output = recipe.runtime.output_dir
    if output.exists() and not output.is_dir():
        raise AlignError(f"output {output} is a file, not a folder")
    held.enter_context(FolderLock(output, "--output folder"))
    found = [p for p in (output / RECIPE_JSON, *(output / s.name for s in recipe.stages)) if p.exists()]
    if not found or resume:
        return
    if not overwrite:
        raise AlignError(f"{output} holds a run ({found[0].name}); pass --resume to continue it or --overwrite to "
                         "start over")
    for path in (*(output / s.name for s in recipe.stages), output / METRICS, output / RECIPE_JSON):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def recipe_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dumps."""
    keys = sorted(set(saved) | set(now)) if isinstance(saved, dict) and isinstance(now, dict) else None
    if keys is None:
        if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
            return [c for i, (a, b) in enumerate(zip(saved, now)) for c in recipe_changes(a, b, f"{prefix}{i}.")]
        return [prefix.rstrip(".")] if saved != now else []
    return [c for k in keys for c in recipe_changes(saved.get(k), now.get(k), f"{prefix}{k}.")]


def check_resumed_recipe(run_dir: Path, recipe: Recipe, allow_changes: bool) -> None:
    """On resume, refuse a recipe that differs from the one the run started with (naming the keys)."""
    saved_path = run_dir / RECIPE_JSON
    if not saved_path.is_file() or allow_changes:
        return
    saved = read_json_object(saved_path)
    now = json.loads(recipe.model_dump_json())
    names = [stage["name"] for stage in now["stages"]]
    changed = [".".join(stage_by_name(k.split("."), names)) for k in recipe_changes(saved, now)
               if k != "runtime.output_dir"]
    if changed:
        raise AlignError(f"--resume with a changed recipe ({', '.join(changed)}); the run started with "
                         f"{saved_path}. Pass --allow-recipe-change to resume anyway")



def trim_metrics(path: Path, stage: str, start: int) -> None:
    """metrics.jsonl as it was at the checkpoint a stage resumes from: its lines for steps after `start` (taken again
    now) and lines a kill tore are dropped, so every step is in the file once."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            later = record.get("stage") == stage and record.get("step", 0) > start
        except (ValueError, AttributeError):
            later = True  # torn by a kill
        if later:
            changed = True
        else:
            kept.append(line)
    if changed:
        write_atomic(path, "".join(line + "\n" for line in kept))
