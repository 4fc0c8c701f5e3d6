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
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from align.errors import AlignError
from align.files import read_json_object, write_atomic

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

