"""What every stage of a training run shares (`Run`: recipe, ranks, backbone, store, frozen LLM) and what one stage
reads (`StageData`: its render cache, the order of its global batches, the store rows they point at)."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from align.adapters.vision_llm import VisionLLM
from align.backbones.registry import backbone_tokenizer
from align.backbones.spec import BackboneSpec
from align.constants import REJECTS
from align.errors import AlignError, SharedError
from align.tools.feature_store import ShardRows
from align.tools.rejects import RejectLog
from align.tools.runtime import Ranks
from align.tools.training.data_order import DataOrder
from align.tools.training.recipe import Recipe, Stage
from align.tools.training.render_cache import RenderCache, build_cache, cache_root, render_workers, settings_for


@dataclass
class Run:
    """What every stage shares: recipe, ranks, backbone, store, frozen LLM, and whether ranks share the output."""

    recipe: Recipe
    ranks: Ranks
    device: torch.device
    spec: BackboneSpec
    store_meta: dict
    model: VisionLLM | None = None
    shared_output: bool = True
    llm_engine: object = None  # under ZeRO-3: the engine that partitions the frozen LLM
    # The evaluation seam (`align train` passes align eval's): (kind, files, limit, pipeline, out, ranks, store) →
    # {"<kind>/<metric>": value}; None where nothing can answer a stage's eval.benchmark.
    evaluator: object = None

    @property
    def main(self) -> bool:
        """True on the process that logs and writes adapters."""
        return self.ranks.main

    @property
    def row_shape(self) -> tuple[int, ...]:
        """[views, queries, width] of the store's rows."""
        return tuple(self.store_meta["row_shape"])


@dataclass
class StageData:
    """A stage's samples (the render cache), their order, and the store rows they point at."""

    cache: RenderCache
    order: DataOrder
    rows: ShardRows
    pad_id: int
    template: str
    rejects: RejectLog | None = None  # rank 0's: samples found broken while training

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        return self.order.steps_per_epoch


def built_cache(run: Run, settings, show_progress: bool) -> RenderCache:
    """Build (one process per node, or rank 0 alone when the folder is shared) or reuse a render cache, then open it
    on every rank."""
    root = cache_root(run.recipe)

    def build() -> str:
        return build_cache(settings, root, render_workers(run.recipe), show_progress and run.main).name

    if run.shared_output:
        name = run.ranks.decide(build)  # rank 0 builds; its failure is every rank's
    else:
        # Each node's first process builds its own copy (the same key from the same inputs); a failure anywhere
        # stops every rank rather than leaving the others waiting.
        problem, built = None, None
        if run.ranks.local_rank == 0:
            try:
                built = build()
            except AlignError as exc:
                problem = str(exc)
        run.ranks.fail_together(problem, "the render cache could not be built on another node")
        name = run.ranks.decide(lambda: built)  # rank 0's (every node built the same key): not computed again
    run.ranks.barrier()
    return RenderCache(root / name)


@dataclass
class ValidationData:
    """A stage's held-out samples (their own render cache) and the store rows they point at."""

    cache: RenderCache
    rows: ShardRows
    pad_id: int


def validation_data(run: Run, stage: Stage, pad_id: int, show_progress: bool) -> ValidationData | None:
    """The render cache of the stage's `eval.data`, rendered exactly as its training data; None without any."""
    if stage.eval is None or not stage.eval.data:
        return None
    held_out = stage.model_copy(update={"data": stage.eval.data})
    cache = built_cache(run, settings_for(run.recipe, run.spec, held_out, run.row_shape[1]), show_progress)
    if len(cache) == 0:
        raise SharedError(f"stage {stage.name}: no usable validation sample in eval.data; rejected: "
                          f"{cache.meta['rejects_by_reason']}")
    return ValidationData(cache, ShardRows(run.recipe.features, cache.meta["store_shards"], run.row_shape), pad_id)


def stage_data(run: Run, stage: Stage, show_progress: bool, resume: bool = False) -> StageData:
    """The stage's render cache (built or reused), its data order and store rows, on every rank."""
    settings = settings_for(run.recipe, run.spec, stage, run.row_shape[1])
    cache = built_cache(run, settings, show_progress)
    stage_dir = run.recipe.runtime.output_dir / stage.name
    if run.main and not (resume and (stage_dir / REJECTS).is_file()):
        # A resumed stage keeps its log: the cache's rejects are in it already, and so are the samples found
        # broken while it trained.
        stage_dir.mkdir(parents=True, exist_ok=True)
        if (cache.path / REJECTS).is_file():  # a cache with no reject has no log
            shutil.copyfile(cache.path / REJECTS, stage_dir / REJECTS)
    if len(cache) == 0:
        reasons = cache.meta["rejects_by_reason"]
        raise SharedError(f"stage {stage.name}: no usable training samples; rejected: {reasons} "
                         f"(details in {stage_dir / REJECTS})")
    order = DataOrder(cache.samples_per_source, [d.ratio for d in stage.data], stage.global_batch_size,
                      run.recipe.runtime.seed, stage.steps_per_epoch)
    rows = ShardRows(run.recipe.features, cache.meta["store_shards"], run.row_shape)
    tokenizer = backbone_tokenizer(run.spec, Path(settings.model))
    rejects = RejectLog(stage_dir / REJECTS) if run.main else None
    return StageData(cache, order, rows, tokenizer.pad_id, cache.meta["template"], rejects)

