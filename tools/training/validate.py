"""`align validate`: what a recipe would fail on at run time, found before anything runs; with `--render`, each
stage's render cache built (or found) and its rejects counted by reason."""

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import AlignError
from align.words import counted
from align.tools.training.recipe import Recipe, RecipeError, Stage, load_recipe


@dataclass
class StageReport:
    """One stage as it would train."""

    name: str
    records: int  # non-blank manifest lines (an upper bound on samples)
    samples: int | None = None  # with --render
    truncated: int | None = None
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    steps: int | None = None
    prompts_per_epoch: bool | None = None
    sampled: int = 0  # records read from the start of each manifest and checked as records and store lookups
    sample_rejects: dict[str, int] = field(default_factory=dict)


SAMPLED_RECORDS = 1000




def sample_rejects(stage: Stage, store=None) -> tuple[int, dict[str, int]]:
    """The first records of each manifest checked as training reads them (lines, fields, images, something to
    learn, and each image in the feature `store` when given): how many were read, and what would be rejected, by
    kind. Cheap: no rendering."""
    from itertools import islice

    from align.tools.manifest import read_manifest, resolve_image
    from align.tools.rejects import reason_kind
    from align.tools.training.training_data import prompted, training_conversation

    class Kinds(Counter):  # counts what a RejectLog would, writing nothing
        def add(self, source: str, reason: str) -> None:
            self[reason_kind(reason)] += 1

    kinds, read = Kinds(), 0
    prompt = stage.prompts[0] if stage.prompts else None
    for source in stage.data:
        for item in islice(read_manifest(source.manifest, kinds), SAMPLED_RECORDS):
            read += 1
            try:
                conversation = training_conversation(prompted(item.record, prompt))
                for ref in conversation.images if store is not None else ():
                    store.locate(resolve_image(ref, item.manifest, source.image_root))
            except AlignError as exc:
                kinds.add(item.where, str(exc))
    return read, dict(kinds)


def check_tokenizer(spec, model: Path) -> str | None:
    """Why the backbone's tokenizer does not load from `model`, or None."""
    from align.backbones.registry import backbone_tokenizer

    try:
        backbone_tokenizer(spec, model)
    except AlignError as exc:
        return f"backbone '{spec.name}': its tokenizer does not load from {model}: {exc}"
    except Exception as exc:  # a damaged tokenizer file raises whatever its library raises
        return f"backbone '{spec.name}': its tokenizer does not load from {model}: {type(exc).__name__}: {exc}"
    return None


def count_records(manifest: Path) -> int:
    """Non-blank lines of a manifest, counted without parsing them."""
    count = 0
    with Path(manifest).open("rb") as lines:
        for line in lines:
            count += bool(line.strip())
    return count


def stage_problems(recipe: Recipe, stage: Stage, records: int, world_size: int) -> list[str]:
    """What would fail in this stage: template choices, batch split, a warm-up longer than the run."""
    problems = []
    where = f"stage {stage.name}"
    if stage.template:
        from align.templates import check_template_name

        try:
            check_template_name(stage.template)
        except AlignError as exc:
            problems.append(f"{where}: {exc}")
    if stage.prompts and (stage.template or "").endswith("caption"):
        problems.append(f"{where}: the {stage.template} template takes no prompt text; drop `prompts` or use a "
                        "chat template (minigpt4-stage2 is MiniGPT-4's prompted one)")
    if split := stage.split_problem(world_size):
        problems.append(split)
    if records:
        steps = stage.epochs * (stage.steps_per_epoch or math.ceil(records / stage.global_batch_size))
        if stage.lr.warmup_steps >= steps:
            problems.append(f"{where}: warmup_steps {stage.lr.warmup_steps} is not shorter than the run (at most "
                            f"{steps} optimizer steps)")
    return problems


def check_recipe(path: Path | str, overrides: list[str] = (), *, world_size: int = 1,
                 render: bool = False, progress: bool = False) -> tuple[Recipe, list[StageReport]]:
    """Validate a recipe and what it points at, reporting every problem at once; `render` builds the caches."""
    from align.backbones.registry import get_backbone
    from align.tools.feature_store import NOT_IN_STORE, FeatureStore

    recipe = load_recipe(path, list(overrides))
    runtime, problems, spec, meta = recipe.runtime, [], None, None
    try:
        spec = get_backbone(recipe.backbone.name)
    except AlignError as exc:
        problems.append(str(exc))
    try:
        meta = FeatureStore.read_meta(recipe.features)
    except AlignError as exc:
        problems.append(str(exc))
    if spec is not None:
        model = recipe.backbone.model or (Path(spec.model_path) if spec.model_path else None)
        if model is None:
            problems.append(f"backbone '{spec.name}' has no model directory: set backbone.model or add it with "
                            "`align add-backbone NAME --model DIR`")
        elif not Path(model).is_dir():
            problems.append(f"backbone model directory {model} does not exist")
        elif problem := check_tokenizer(spec, Path(model)):
            problems.append(problem)
        if spec.remote_code and not runtime.trust_remote_code:
            problems.append(f"backbone '{spec.name}' runs its own model code: set runtime.trust_remote_code: true "
                            "if you trust it")
    if runtime.zero_stage == 3 and runtime.quantization != "none":
        problems.append("zero_stage 3 partitions the frozen LLM and 8/4-bit weights cannot be partitioned: "
                        "use quantization none with ZeRO-3, or zero_stage 0-2 with quantization")
    if runtime.offload_params and runtime.zero_stage != 3:
        problems.append("runtime.offload_params needs zero_stage 3")
    store = FeatureStore.open(recipe.features) if meta is not None else None
    reports = []
    for stage in recipe.stages:
        missing = [d.manifest for d in stage.data if not d.manifest.is_file()]
        problems += [f"stage {stage.name}: manifest {m} " + ("is a directory" if m.is_dir() else "does not exist")
                     for m in missing]
        problems += [f"stage {stage.name}: eval manifest {d.manifest} does not exist"
                     for d in (stage.eval.data if stage.eval else ()) if not d.manifest.is_file()]
        problems += [f"stage {stage.name}: eval benchmark file {m} does not exist"
                     for m in (stage.eval.benchmark.missing() if stage.eval and stage.eval.benchmark else ())]
        records = 0 if missing else sum(count_records(d.manifest) for d in stage.data)
        problems += stage_problems(recipe, stage, records, world_size)
        report = StageReport(stage.name, records)
        if not missing:
            report.sampled, report.sample_rejects = sample_rejects(stage, store)
            if report.sampled and report.sample_rejects.get(NOT_IN_STORE) == report.sampled:
                roots = ", ".join(str(d.image_root) for d in stage.data if d.image_root) or "their manifests' folders"
                problems.append(f"stage {stage.name}: none of the first {report.sampled} records' images is in the "
                                f"feature store {recipe.features} (looked up relative to {roots}): extract them "
                                "with `align features extract`, or set the data source's image_root to the "
                                "--image-root they were extracted with")
        reports.append(report)
    if problems:
        raise RecipeError(f"{path}: {counted(len(problems), 'problem')}: " + "; ".join(problems))
    if render:
        render_stages(recipe, spec, meta, reports, progress)
    return recipe, reports


def render_stages(recipe: Recipe, spec, store_meta: dict, reports: list[StageReport], progress: bool) -> None:
    """Build (or find) each stage's render cache and fill its report; a stage with no sample is a problem."""
    from align.tools.training.data_order import DataOrder
    from align.tools.training.render_cache import RenderCache, build_cache, cache_root, render_workers, settings_for

    problems = []
    for stage, report in zip(recipe.stages, reports):
        settings = settings_for(recipe, spec, stage, store_meta["row_shape"][1])
        cache = RenderCache(build_cache(settings, cache_root(recipe), render_workers(recipe), progress))
        meta = cache.meta
        report.samples, report.truncated = len(cache), meta["truncated"]
        report.rejects_by_reason, report.prompts_per_epoch = meta["rejects_by_reason"], meta["prompts_per_epoch"]
        if not len(cache):
            problems.append(f"stage {stage.name}: no usable training samples (rejected: {report.rejects_by_reason})")
            continue
        order = DataOrder(cache.samples_per_source, [d.ratio for d in stage.data], stage.global_batch_size,
                          recipe.runtime.seed, stage.steps_per_epoch)
        report.steps = stage.epochs * order.steps_per_epoch
        if stage.lr.warmup_steps >= report.steps:
            problems.append(f"stage {stage.name}: warmup_steps {stage.lr.warmup_steps} is not shorter than the run "
                            f"({report.steps} optimizer steps)")
    if problems:
        raise RecipeError(f"{counted(len(problems), 'problem')}: " + "; ".join(problems))
