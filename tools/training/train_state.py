"""Training state on disk without pickles: what a stage needs to resume exactly, as safetensors plus JSON.

Layout (under a stage's `checkpoints/`):
  step00000040/rank00000.safetensors   this rank's tensors: projector, optimizer state, torch RNG states
  step00000040/rank00000.json          the rest of this rank's state as JSON (the tensors' places in it, numbers,
                                       Python's and NumPy's RNG states)
  step00000040/state.json              written by rank 0 once every rank's files are on disk: the commit mark
Every file is written atomically; a checkpoint counts only once its state.json exists, so a kill at any moment
leaves the previous checkpoint as the latest. Nothing here is ever unpickled: a planted file can hold data, not code.

The optimizer state is DeepSpeed's own state dict (partitioned by rank under ZeRO 1-3), flattened: tensors go to
safetensors by path, everything else to JSON with dict keys and tuples kept as they were.

`save_checkpoint` and `restore` take a run's engine to and from that layout: every rank writes its part, rank 0
commits; on resume rank 0 picks the newest readable checkpoint and every rank loads its own part.
"""

import json
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from align.errors import AlignError, SharedError
from align.files import WriteError, read_json_object, write_atomic
from align.words import counted
from align.tools.training.run import Run

STATE = "state.json"


class StateError(AlignError):
    """A training state that cannot be read or does not fit this run."""


def step_dir(checkpoints: Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` optimizer steps."""
    return Path(checkpoints) / f"step{step:08d}"


def committed_steps(checkpoints: Path) -> list[int]:
    """Steps with a whole checkpoint (its state.json written), oldest first."""
    steps = []
    for folder in Path(checkpoints).glob("step*"):
        if (folder / STATE).is_file() and folder.name[4:].isdigit():
            steps.append(int(folder.name[4:]))
    return sorted(steps)


def flatten(tree, tensors: dict[str, torch.Tensor], path: str = "s"):
    """`tree` as JSON-able data, its tensors moved into `tensors` (by path) and replaced by references."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(tree, dict):
        return {"dict": [[flatten(k, tensors, f"{path}.k{i}"), flatten(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(tree.items())]}
    if isinstance(tree, (list, tuple)):
        items = [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
        return {"tuple": items} if isinstance(tree, tuple) else {"list": items}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    if isinstance(tree, (np.integer, np.floating)):
        return {"value": tree.item()}
    name = type(tree).__name__
    if state_classes().get(name) is type(tree):
        return {"object": name, "fields": flatten(dict(vars(tree)), tensors, f"{path}.o")}
    raise StateError(f"cannot store a {name} in a training state (at {path})")


def state_classes() -> dict[str, type]:
    """The only classes a training state may hold besides data: DeepSpeed's loss scalers and slice addresses,
    rebuilt from their fields (never from code named in a file)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    return {c.__name__: c for c in (LossScaler, DynamicLossScaler, fragment_address)}


def unflatten(data, tensors: dict[str, torch.Tensor]):
    """The tree `flatten` described."""
    kind = next(iter(data))
    value = data[kind]
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in value}
    if kind == "list":
        return [unflatten(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(unflatten(v, tensors) for v in value)
    if kind == "value":
        return value
    if kind == "object":
        cls = state_classes().get(value)
        if cls is None:
            raise StateError(f"a training state names class {value!r}, which align does not rebuild")
        rebuilt = cls.__new__(cls)
        rebuilt.__dict__.update(unflatten(data["fields"], tensors))
        return rebuilt
    raise StateError(f"unknown entry {kind!r} in a training state")


def rng_state() -> dict:
    """Every random number generator a rank uses: Python's, NumPy's, torch's CPU one and each CUDA device's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    """This rank's part of a checkpoint: tensors to safetensors, the rest to JSON, each atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors sharing memory; each gets its own copy.
    write_atomic(folder / f"rank{rank:05d}.safetensors", _safetensors_bytes({k: v.clone() for k, v in tensors.items()}))
    write_atomic(folder / f"rank{rank:05d}.json", json.dumps(skeleton))


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors) if tensors else save({"_": torch.zeros(0)})


def load_rank_state(folder: Path, rank: int) -> dict:
    """This rank's part of a checkpoint, as saved."""
    weights, skeleton = folder / f"rank{rank:05d}.safetensors", folder / f"rank{rank:05d}.json"
    if not weights.is_file() or not skeleton.is_file():
        raise StateError(f"{folder} holds no state of rank {rank} (was the run started with another number of "
                         "processes, or on nodes that do not share the output folder?)")
    try:
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise StateError(f"cannot read {weights}: {exc}") from None
    return unflatten(read_json_object(skeleton, StateError), tensors)


def commit(folder: Path, info: dict) -> None:
    """Mark a checkpoint whole (rank 0, after every rank saved)."""
    write_atomic(folder / STATE, json.dumps(info, indent=1))


def read_commit(folder: Path) -> dict:
    """A whole checkpoint's state.json."""
    return read_json_object(folder / STATE, StateError)


def prune(checkpoints: Path, keep: int, rank: int, main: bool) -> None:
    """Keep the newest `keep` whole checkpoints: rank 0 removes older folders (and unfinished ones); every rank
    removes its own files from them, for nodes that do not share the folder."""
    steps = committed_steps(checkpoints)
    old = steps[:-keep] if keep > 0 else steps
    for step in old:
        folder = step_dir(checkpoints, step)
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for file in folder.glob(f"rank{rank:05d}.*"):
                file.unlink(missing_ok=True)
    if main and steps:
        for folder in Path(checkpoints).glob("step*"):
            if not (folder / STATE).is_file() and folder.name[4:].isdigit() and int(folder.name[4:]) < steps[-1]:
                shutil.rmtree(folder, ignore_errors=True)


# -- a run's engine ----------------------------------------------------------------------------------------------


@dataclass
class Stats:
    """What a finished stage reports."""

    applied: int = 0
    skipped: list[int] = field(default_factory=list)
    last_loss: float | None = None
    muted: int = 0  # samples that learnt nothing because their features were not finite
    data: str | None = None  # the render cache's key: manifests, tokenizer, template and store the stage trains on


def projector_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full projector weights on every rank (gathered from ZeRO-3 partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params) if zero_stage == 3 else nullcontext()
    with context:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def diverged(checkpoints: Path, step: int, what: str) -> None:
    """Stop a stage whose training stopped being finite (every rank sees the same reduced loss and weights), keeping
    the checkpoints saved before it."""
    kept = committed_steps(checkpoints)
    where = f"its checkpoint of step {kept[-1]} is kept" if kept else "no checkpoint of it was saved"
    raise SharedError(f"stage {checkpoints.parent.name} diverged at step {step}: {what}; nothing of it is written from "
                      f"here on ({where}). Lower the stage's learning rate or check its data, then run again with "
                      "--overwrite or --resume")


def save_checkpoint(run: Run, engine, scheduler, checkpoints: Path, step: int, stats: Stats) -> None:
    """Every rank writes its state, then rank 0 commits the checkpoint and prunes old ones."""
    folder = step_dir(checkpoints, step)
    projector = projector_state(engine, run.recipe.runtime.zero_stage)  # fp32: exact for fp16/bf16 weights too
    if not all(torch.isfinite(t).all() for t in projector.values()):  # the same on every rank: weights are whole
        diverged(checkpoints, step, "the projector's weights are not finite")
    state = {"projector": projector, "optimizer": engine.optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_state()}
    problem = None
    try:
        save_rank_state(folder, run.ranks.rank, state)
    except (OSError, WriteError) as exc:  # a full disk on one node must stop every rank, not leave the others waiting
        problem = f"cannot write the checkpoint of step {step}: {exc.strerror if isinstance(exc, OSError) else exc}"
    run.ranks.fail_together(problem, f"another rank could not write the checkpoint of step {step}")
    if run.main:
        commit(folder, {"step": step, "world": run.ranks.world, "applied": stats.applied, "skipped": stats.skipped,
                        "last_loss": stats.last_loss, "muted": stats.muted, "data": stats.data})
    run.ranks.barrier()
    prune(checkpoints, run.recipe.runtime.keep_checkpoints, run.ranks.rank, run.main)


def restore(run: Run, engine, scheduler, checkpoints: Path) -> tuple[int, Stats]:
    """Load the newest readable checkpoint (candidates chosen by rank 0) into the engine; returns its step and stats.
    A damaged newest one (a full disk, a torn file) falls back to the one before, saying so."""
    candidates = run.ranks.decide(lambda: committed_steps(checkpoints)[::-1])
    if not candidates:
        return 0, Stats()
    problems = []
    for step in candidates:
        info = run.ranks.decide(lambda: _commit_or_none(checkpoints, step))
        problem, state = None, None
        if info is None:
            problem = "its state.json is unreadable"
        elif info["world"] != run.ranks.world:
            raise AlignError(f"{checkpoints}: the checkpoint of step {step} was taken with "
                             f"{counted(info['world'], 'process')}, this run has {run.ranks.world}; resume with as many")
        else:
            try:
                state = load_rank_state(step_dir(checkpoints, step), run.ranks.rank)
            except AlignError as exc:
                problem = str(exc)
        if run.ranks.all(problem is None):
            if problems and run.main:
                print(f"note: {'; '.join(problems)}; resuming from step {step}", flush=True)
            load_state(run, engine, scheduler, state)
            return step, Stats(info["applied"], list(info["skipped"]), info["last_loss"], info.get("muted", 0),
                               info.get("data"))
        problems.append(f"checkpoint step {step} is damaged ({problem or 'on another rank'})")
    raise AlignError(f"{checkpoints}: no readable checkpoint ({'; '.join(problems)}); --overwrite starts over")


def _commit_or_none(checkpoints: Path, step: int) -> dict | None:
    try:
        return read_commit(step_dir(checkpoints, step))
    except AlignError:
        return None


def load_state(run: Run, engine, scheduler, state: dict) -> None:
    """Put a rank's saved state into the engine (projector, DeepSpeed's optimizer), the schedule and the RNGs."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = run.recipe.runtime.zero_stage == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if gather else nullcontext():
        engine.module.load_state_dict(state["projector"])
    optimizer_state = state["optimizer"]
    if run.recipe.runtime.zero_stage in (1, 2):
        # DeepSpeed's ZeRO 1/2 optimizer takes every rank's list and picks its own entry.
        listed = [None] * run.ranks.world
        listed[run.ranks.rank] = optimizer_state
        engine.optimizer.load_state_dict(listed, load_from_fp32_weights=True)
    elif run.recipe.runtime.zero_stage == 3:
        engine.optimizer.load_state_dict([optimizer_state], load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])

