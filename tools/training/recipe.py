"""Recipe files: strict YAML schemas, every problem reported at once, misspelt keys answered with the closest one."""

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from align.adapters.projector import projector_names
from align.constants import METRICS, RECIPE_JSON, RENDER_CACHE_DIR
from align.errors import AlignError
from align.files import FolderLock
from align.words import counted


class RecipeError(AlignError):
    """A recipe that does not validate; the message lists every problem."""


RUN_FILES = frozenset({RECIPE_JSON, METRICS, FolderLock.NAME, RENDER_CACHE_DIR})  # beside the stage folders


class Strict(BaseModel):
    """Unknown keys are errors, and so are infinite or NaN numbers (a rate of .inf trains NaN)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BackboneRef(Strict):
    """Which LLM: a registry name, optionally with a model directory that overrides the added one."""

    name: str = Field(description="backbone name from `align backbones list`")
    model: Path | None = Field(None, description="local model directory (default: the added backbone's)")


class DataSource(Strict):
    """One manifest and its share of the samples when several are mixed."""

    manifest: Path
    ratio: float = Field(1.0, gt=0, description="relative sampling weight among the stage's manifests")
    image_root: Path | None = Field(None, description="folder the manifest's relative image paths start from (as "
                                    "`features extract --image-root`); default: the manifest's folder")


class Schedule(Strict):
    """MiniGPT-4's schedule: linear warm-up from warmup_lr to init_lr, then cosine down to min_lr."""

    # Adam's step is the rate itself: above 10 nothing trains, and near float's limit torch's Adam overflows.
    init_lr: float = Field(gt=0, le=10)
    min_lr: float = Field(0.0, ge=0, le=10)
    warmup_lr: float = Field(0.0, ge=0, le=10)
    warmup_steps: int = Field(0, ge=0)


BENCHMARK_KINDS = ("coco-caption", "vqa", "pope", "mme", "mmbench", "scienceqa", "jsonl")


class EvalBenchmark(Strict):
    """A benchmark asked during a stage as `align eval` asks it (greedy, a fresh conversation per question), with the
    projector as it is at that step; its images are read from the run's feature store."""

    kind: Literal[BENCHMARK_KINDS]
    files: dict[str, Path] = Field(description="its inputs by align eval's option names (questions, annotations, "
                                   "images, references, root, tsv, problems, data)")
    limit: int | None = Field(200, gt=0, description="a fixed, seeded subsample of this many questions")
    prompt: str | None = Field(None, description="what is asked with each image (default: the benchmark's own)")
    max_new_tokens: int | None = Field(None, gt=0, description="the answers' length limit (default: the benchmark's)")
    batch_size: int = Field(8, gt=0, description="questions per generation batch")

    def missing(self) -> list[Path]:
        """Its files (and folders) that do not exist: found before training starts, not hours into it."""
        return [path for name, path in self.files.items() if name != "image_pattern" and not path.exists()]


class StageEval(Strict):
    """Evaluation during a stage, every `every` steps and at its end, logged in that step's line of metrics.jsonl:
    the loss on held-out records (per supervised token, like the training loss) and/or a benchmark's scores."""

    data: list[DataSource] = Field(default_factory=list, description="held-out manifests (images in the store)")
    benchmark: EvalBenchmark | None = None
    every: int = Field(0, ge=0, description="optimizer steps between evaluations (0: only at the stage's end)")
    at_start: bool = Field(False, description="also ask the benchmark before the first step, of the projector as the "
                           "stage starts it (answers and scores in STAGE/eval/step00000000)")
    keep_best: str | None = Field(
        None, description="also keep the best adapter in STAGE/best/adapter: 'val_loss' (lowest) or a benchmark "
        "score such as 'vqa/overall' (highest)")

    @model_validator(mode="after")
    def _something_to_evaluate(self) -> "StageEval":
        if not self.data and self.benchmark is None:
            raise ValueError("eval needs data (held-out manifests), a benchmark, or both")
        if self.at_start and self.benchmark is None:
            raise ValueError("at_start asks the benchmark: give eval a benchmark")
        if self.keep_best == "val_loss" and not self.data:
            raise ValueError("keep_best: val_loss needs eval data")
        if self.keep_best not in (None, "val_loss") and not (
                self.benchmark and self.keep_best.startswith(f"{self.benchmark.kind}/")):
            raise ValueError(f"keep_best must be val_loss or a score of the eval benchmark "
                             f"('{self.benchmark.kind if self.benchmark else 'KIND'}/<metric>'), not {self.keep_best!r}")
        return self


class Stage(Strict):
    """One training stage; stages run in order, each starting from the previous one's adapter."""

    # A folder under the output directory: letters, digits, '_', '-', '.', and never only dots ('..' would escape).
    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$|^\.+[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
    data: list[DataSource] = Field(min_length=1)
    template: str | None = Field(None, description="chat template (default: the backbone's; 'caption' for stage 1)")
    prompts: list[str] | None = Field(None, description="turn caption records into one exchange with a random prompt")
    max_length: int = Field(512, gt=0)
    global_batch_size: int = Field(gt=0, description="samples per optimizer step, whatever the number of processes")
    micro_batch_size: int = Field(1, gt=0, description="samples per forward pass on one process")
    epochs: int = Field(1, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0, description="optimizer steps per epoch (default: one data pass)")
    truncate: Literal["reply", "turns"] | None = Field(
        None, description="too long: 'reply' cuts the last reply to fit, 'turns' drops whole exchanges and refuses "
        "a first exchange that does not fit (default: 'reply' for caption stages, else 'turns')")
    loss: Literal["token", "micro_batch_mean"] = Field(
        "token", description="'token': mean over the global batch's supervised tokens (invariant to micro-batches "
        "and processes); 'micro_batch_mean': MiniGPT-4's mean of per-micro-batch means, for exact reproductions")
    lr: Schedule
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay of weight matrices (never biases or norms)")
    init_from: str | None = Field("previous", description="'previous' stage's adapter, an adapter path, or null")
    eval: StageEval | None = Field(None, description="validation loss on held-out records during the stage")

    @property
    def caption_stage(self) -> bool:
        """A stage of captions: prompted caption records, or a caption template."""
        return bool(self.prompts) or (self.template or "").endswith("caption")

    @property
    def truncation(self) -> str:
        """The truncation mode in force."""
        return self.truncate or ("reply" if self.caption_stage else "turns")

    def split_problem(self, world_size: int) -> str | None:
        """Why the global batch cannot be split over `world_size` processes, if it cannot."""
        if self.global_batch_size % (self.micro_batch_size * world_size):
            return (f"stage {self.name}: global_batch_size {self.global_batch_size} does not split into "
                    f"micro-batches of {self.micro_batch_size} over {counted(world_size, 'process')}")
        return None

    @model_validator(mode="after")
    def _not_a_run_file(self) -> "Stage":
        # A stage's folder sits beside the run's own files: a stage named like one would break the run folder.
        if self.name in RUN_FILES:
            raise ValueError(f"stage name {self.name!r} is a file of the run folder; choose another")
        return self

    @model_validator(mode="after")
    def _batches_divide(self) -> "Stage":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        return self


class Runtime(Strict):
    """How the stages run: precision, memory savers, DeepSpeed ZeRO, checkpoints."""

    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    quantization: Literal["none", "8bit", "4bit"] = "none"
    gradient_checkpointing: bool = False
    zero_stage: int = Field(2, ge=0, le=3, description="3 also partitions the frozen LLM's weights across ranks")
    offload_params: bool = Field(False, description="with zero_stage 3: keep the frozen LLM's partitions in CPU memory")
    seed: int = 42
    save_interval: int = Field(500, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept per stage (older ones are deleted)")
    render_cache: Path | None = Field(None, description="folder of render caches (default: <output_dir>/render-cache)")
    render_workers: int | None = Field(None, ge=1, description="processes that build a render cache (default: cores)")
    report_to: list[Literal["tensorboard"]] = Field(
        default_factory=list, description="also write step metrics as TensorBoard events in <output_dir>/tensorboard")
    output_dir: Path = Path("runs/align")
    gradient_clipping: float = Field(1.0, ge=0)
    trust_remote_code: bool = False


class Recipe(Strict):
    """A whole training run: backbone, feature store, projector, stages, runtime."""

    backbone: BackboneRef
    features: Path = Field(description="feature store made by `align features extract`")
    projector: str = "linear"
    projector_init: Literal["matched", "default"] = Field(
        "matched", description="a stage's new projector: 'matched' rescales it so that its outputs on the stage's "
        "features have the mean and spread of the LLM's input embeddings; 'default': PyTorch's own init")
    stages: list[Stage] = Field(min_length=1)
    runtime: Runtime = Field(default_factory=Runtime)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.projector not in projector_names():
            raise ValueError(f"projector {self.projector!r} is not one of {', '.join(projector_names())}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        if self.stages[0].init_from == "previous":
            self.stages[0].init_from = None
        return self


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the last key of `loc`."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def stage_by_name(parts: Sequence, stage_names: Sequence) -> tuple:
    """The parts of a key with a stage's index replaced by its name (`stages.1.lr` → `stages.finetune.lr`), as
    --set names stages; the index may be an int or its digits. Unchanged where the stage has no name."""
    index = str(parts[1]) if len(parts) > 1 and parts[0] == "stages" else ""
    if index.isdigit() and int(index) < len(stage_names) and isinstance(stage_names[int(index)], str):
        return (parts[0], stage_names[int(index)], *parts[2:])
    return tuple(parts)


def _describe(error: dict, stage_names: list) -> str:
    loc = tuple(error["loc"])
    # A problem with a stage's name itself keeps the index: the name is what is wrong.
    shown = stage_by_name(loc, stage_names) if len(loc) > 2 and loc[2] != "name" else loc
    where = ".".join(str(p) for p in shown) or "recipe"
    if error["type"] == "extra_forbidden":
        owner = _model_at(Recipe, loc)
        close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields) if owner else [], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: unknown key{hint}"
    return f"{where}: {error['msg']}"


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML; a stage may be named instead of numbered)."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [s.get("name") for s in node if isinstance(s, dict)]
            index = int(part) if part.isdigit() else (names.index(part) if part in names else None)
            if index is None or index >= len(node):
                raise RecipeError(f"--set {key}: no item '{part}' (have {', '.join(map(str, names))})")
            part = index
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {key}: '{parts[i - 1]}' is not a section")
        if last:
            try:
                node[part] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                problem = str(exc).replace("\n", " ")
                raise RecipeError(f"--set {key}: the value is not plain YAML ({problem})") from None
        else:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]


SHIPPED_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _resolve(path: Path | None, base: Path) -> Path | None:
    return None if path is None else (path if path.expanduser().is_absolute() else base / path).expanduser()


def _set_keys(overrides: list[str], data: dict) -> set[tuple]:
    """The recipe locations (stage names turned into indices) that `--set` assigned, or whose parent it assigned."""
    names = [s.get("name") for s in data.get("stages", []) if isinstance(s, dict)] if isinstance(data, dict) else []
    keys = set()
    for assignment in overrides:
        parts = assignment.split("=", 1)[0].split(".")
        if len(parts) > 1 and parts[0] == "stages" and parts[1] in names:
            parts[1] = str(names.index(parts[1]))
        keys.add(tuple(parts))
    return keys


def load_recipe(path: Path | str, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate. Relative paths a run reads (store, model, manifests, init_from) are relative to
    the recipe's file, except in a recipe shipped inside align; paths it writes (output_dir, render_cache) and
    those given with `--set` are relative to the working directory (where the command was typed)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text (UTF-8) file; a recipe is YAML") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        stages = data.get("stages") if isinstance(data.get("stages"), list) else []
        names = [s.get("name") if isinstance(s, dict) else None for s in stages]
        problems = [_describe(e, names) for e in exc.errors()]
        raise RecipeError(f"{path}: {counted(len(problems), 'problem')}: " + "; ".join(problems)) from None
    typed = _set_keys(list(overrides), data)
    recipe_dir, cwd = path.parent.resolve(), Path.cwd()
    shipped = recipe_dir == SHIPPED_RECIPES  # nothing a user reads or writes lives inside the package

    def resolve(value: Path | None, *where, written: bool = False) -> Path | None:
        where = tuple(str(w) for w in where)
        from_command_line = any(where[:len(key)] == key for key in typed)
        return _resolve(value, cwd if from_command_line or written or shipped else recipe_dir)

    recipe.features = resolve(recipe.features, "features")
    recipe.backbone.model = resolve(recipe.backbone.model, "backbone", "model")
    recipe.runtime.output_dir = resolve(recipe.runtime.output_dir, "runtime", "output_dir", written=True)
    recipe.runtime.render_cache = resolve(recipe.runtime.render_cache, "runtime", "render_cache", written=True)
    for i, stage in enumerate(recipe.stages):
        for j, source in enumerate(stage.data):
            source.manifest = resolve(source.manifest, "stages", i, "data", j, "manifest")
            source.image_root = resolve(source.image_root, "stages", i, "data", j, "image_root")
        for j, source in enumerate(stage.eval.data if stage.eval else ()):
            source.manifest = resolve(source.manifest, "stages", i, "eval", "data", j, "manifest")
            source.image_root = resolve(source.image_root, "stages", i, "eval", "data", j, "image_root")
        if stage.eval and stage.eval.benchmark:
            files = stage.eval.benchmark.files
            for name in files:
                files[name] = resolve(files[name], "stages", i, "eval", "benchmark", "files", name)
        if stage.init_from not in (None, "previous"):
            stage.init_from = str(resolve(Path(stage.init_from), "stages", i, "init_from"))
    return recipe
