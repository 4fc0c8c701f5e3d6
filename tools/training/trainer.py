"""`align train`: run a recipe's stages in order, training only the projector under a DeepSpeed engine.

A stage runs in named steps: its data (the render cache and the order of global batches), its engine (the
projector, its optimizer and schedule under DeepSpeed), resuming (align's own pickle-free training state), the
optimizer steps, and finishing (adapter, summary). Every choice read from a file is taken on rank 0 and shared.

The loss of a global batch is the sum of its supervised tokens' cross-entropy divided by their number over the
whole global batch, so the adapter does not depend on the micro-batch size or the number of processes
(`loss: micro_batch_mean` keeps MiniGPT-4's mean of micro-batch means for exact reproductions).
"""

import json
import math
import random
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from align.adapters.adapter_files import AdapterConfig, load_adapter, save_adapter
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones.dtypes import TORCH_DTYPES
from align.backbones.llm import full_shape, load_frozen_llm, remote_code_opt_in
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.spec import BackboneSpec
from align.constants import ADAPTER_DIR, CHECKPOINTS, METRICS, RECIPE_JSON, REJECTS, STAGE_DONE
from align.errors import AlignError, SharedError
from align.files import FolderLock, read_json_object, write_atomic
from align.templates import IGNORE_INDEX
from align.tools.feature_store import FeatureStore, ShardRows
from align.tools.rejects import RejectLog
from align.tools.runtime import Ranks, local_device, progress_columns, start_ranks
from align.tools.training import train_state
from align.tools.training.data_order import DataOrder
from align.tools.training.recipe import Recipe, Stage, load_recipe, stage_by_name
from align.tools.training.render_cache import RenderCache, build_cache, cache_root, render_workers, settings_for
from align.tools.training.training_data import collate


def gradient_norm(parameters) -> float | None:
    """The L2 norm of the gradients held in `.grad` (ZeRO 0 keeps them there; DeepSpeed reports none itself)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None


def lr_at(step: int, total: int, stage: Stage) -> float:
    """Linear warm-up from warmup_lr to init_lr, then cosine decay to min_lr (MiniGPT-4's schedule)."""
    s = stage.lr
    if step < s.warmup_steps:
        return s.warmup_lr + (s.init_lr - s.warmup_lr) * step / max(1, s.warmup_steps)
    progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.min_lr + (s.init_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StopOnInterrupt:
    """Turns Ctrl-C into a request that the training loop honours at the end of the running step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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


@dataclass
class StepTotals:
    """One optimizer step, summed over ranks."""

    loss_sum: float = 0.0  # cross-entropy summed over supervised tokens (token loss), or of micro-batch means
    supervised: int = 0
    micro_batches: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    stop: int = 0
    muted: int = 0  # samples of the global batch whose features were not finite (the same on every rank)

    def reduce(self, ranks: Ranks) -> "StepTotals":
        """The totals over every rank."""
        if ranks.world == 1:
            return self
        values = torch.tensor([getattr(self, f) for f in self.__dataclass_fields__], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        kinds = {f: type(getattr(self, f)) for f in self.__dataclass_fields__}
        return StepTotals(**{f: kinds[f](v) for f, v in zip(self.__dataclass_fields__, values.tolist())})


@dataclass
class Stats:
    """What a finished stage reports."""

    applied: int = 0
    skipped: list[int] = field(default_factory=list)
    last_loss: float | None = None
    muted: int = 0  # samples that learnt nothing because their features were not finite


# -- data ----------------------------------------------------------------------------------------------------------


def stage_data(run: Run, stage: Stage, show_progress: bool, resume: bool = False) -> StageData:
    """Build (one process per node, or rank 0 alone when the folder is shared) or reuse the stage's render cache,
    then open it on every rank."""
    settings = settings_for(run.recipe, run.spec, stage, run.row_shape[1])
    root = cache_root(run.recipe)

    def build() -> str:
        return build_cache(settings, root, render_workers(run.recipe), show_progress and run.main).name

    if run.shared_output:
        name = run.ranks.decide(build)  # rank 0 builds; its failure is every rank's
    else:
        # Each node's first process builds its own copy (the same key from the same inputs); a failure anywhere
        # stops every rank rather than leaving the others waiting.
        problem = None
        if run.ranks.local_rank == 0:
            try:
                build()
            except AlignError as exc:
                problem = str(exc)
        run.ranks.fail_together(problem, "the render cache could not be built on another node")
        name = run.ranks.decide(build)  # already built: rank 0 only reads the name
    run.ranks.barrier()
    cache = RenderCache(root / name)
    stage_dir = run.recipe.runtime.output_dir / stage.name
    if run.main and not (resume and (stage_dir / REJECTS).is_file()):
        # A resumed stage keeps its log: the cache's rejects are in it already, and so are the samples found
        # broken while it trained.
        stage_dir.mkdir(parents=True, exist_ok=True)
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


# -- engine --------------------------------------------------------------------------------------------------------


def parameter_groups(projector: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices decay, biases and norm scales do not (as LAVIS / MiniGPT-4's runner)."""
    decay = [p for p in projector.parameters() if p.ndim >= 2]
    plain = [p for p in projector.parameters() if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


def initial_projector(run: Run, stage: Stage, previous: Path | None) -> torch.nn.Module:
    """A new projector, or the previous stage's / a given adapter loaded into it (read by rank 0, checked, shared)."""
    torch.manual_seed(run.recipe.runtime.seed)
    projector = build_projector(run.recipe.projector, run.row_shape[-1], run.spec.hidden_size)
    source = previous if stage.init_from == "previous" else (Path(stage.init_from) if stage.init_from else None)
    if source is None:
        return projector

    def read() -> dict:
        config, state = load_adapter(source)
        config.check_fits(backbone=run.spec.name, hidden_size=run.spec.hidden_size, vocab_size=run.spec.vocab_size,
                          template=config.template, num_query_tokens=run.row_shape[1],
                          encoder_fingerprint=run.store_meta["encoder_fingerprint"], where=str(source))
        return {k: v.numpy() for k, v in state.items()}

    state = run.ranks.decide(read)
    projector.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return projector


def make_engine(run: Run, stage: Stage, previous: Path | None, total: int):
    """The projector under DeepSpeed with AdamW and the stage's schedule; returns (engine, scheduler)."""
    import deepspeed

    runtime = run.recipe.runtime
    micro_per_rank = stage.global_batch_size // (stage.micro_batch_size * run.ranks.world)
    projector = initial_projector(run, stage, previous)
    optimizer = torch.optim.AdamW(parameter_groups(projector, stage.weight_decay), lr=stage.lr.init_lr)
    on_gpu = run.device.type == "cuda"
    ds_config = {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": micro_per_rank,
        "gradient_clipping": runtime.gradient_clipping,
        "zero_optimization": {"stage": runtime.zero_stage},
        "bf16": {"enabled": runtime.precision == "bf16" and on_gpu},
        "fp16": {"enabled": runtime.precision == "fp16" and on_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, scheduler = deepspeed.initialize(
        model=projector, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_at(s, total, stage) / stage.lr.init_lr),
    )
    run.model.projector = engine
    run.model.check_frozen()
    return engine, scheduler


def projector_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full projector weights on every rank (gathered from ZeRO-3 partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params) if zero_stage == 3 else nullcontext()
    with context:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def adapter_config(run: Run, stage: Stage, step: int, template: str) -> AdapterConfig:
    """The metadata that binds this stage's projector to its backbone, template and encoder."""
    return AdapterConfig.for_backbone(
        run.spec, projector=run.recipe.projector, in_features=run.row_shape[-1], template=template,
        num_query_tokens=run.row_shape[1], encoder_fingerprint=run.store_meta["encoder_fingerprint"],
        stage=stage.name, step=step,
    )


# -- resume --------------------------------------------------------------------------------------------------------


def save_checkpoint(run: Run, engine, scheduler, checkpoints: Path, step: int, stats: Stats) -> None:
    """Every rank writes its state, then rank 0 commits the checkpoint and prunes old ones."""
    folder = train_state.step_dir(checkpoints, step)
    projector = projector_state(engine, run.recipe.runtime.zero_stage)  # fp32: exact for fp16/bf16 weights too
    state = {"projector": projector, "optimizer": engine.optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": train_state.rng_state()}
    problem = None
    try:
        train_state.save_rank_state(folder, run.ranks.rank, state)
    except OSError as exc:  # a full disk on one node must stop every rank, not leave the others waiting
        problem = f"cannot write the checkpoint of step {step} in {folder}: {exc.strerror or exc}"
    run.ranks.fail_together(problem, f"another rank could not write the checkpoint of step {step}")
    if run.main:
        train_state.commit(folder, {"step": step, "world": run.ranks.world, "applied": stats.applied,
                                    "skipped": stats.skipped, "last_loss": stats.last_loss, "muted": stats.muted})
    run.ranks.barrier()
    train_state.prune(checkpoints, run.recipe.runtime.keep_checkpoints, run.ranks.rank, run.main)


def restore(run: Run, engine, scheduler, checkpoints: Path) -> tuple[int, Stats]:
    """Load the newest readable checkpoint (candidates chosen by rank 0) into the engine; returns its step and stats.
    A damaged newest one (a full disk, a torn file) falls back to the one before, saying so."""
    candidates = run.ranks.decide(lambda: train_state.committed_steps(checkpoints)[::-1])
    if not candidates:
        return 0, Stats()
    problems = []
    for step in candidates:
        info = run.ranks.decide(lambda: _commit_or_none(checkpoints, step))
        problem, state = None, None
        if info is None:
            problem = "its state.json is unreadable"
        elif info["world"] != run.ranks.world:
            raise AlignError(f"{checkpoints}: the checkpoint of step {step} was taken with {info['world']} "
                             f"process(es), this run has {run.ranks.world}; resume with as many")
        else:
            try:
                state = train_state.load_rank_state(train_state.step_dir(checkpoints, step), run.ranks.rank)
            except AlignError as exc:
                problem = str(exc)
        if run.ranks.all(problem is None):
            if problems and run.main:
                print(f"note: {'; '.join(problems)}; resuming from step {step}", flush=True)
            load_state(run, engine, scheduler, state)
            return step, Stats(info["applied"], list(info["skipped"]), info["last_loss"], info.get("muted", 0))
        problems.append(f"checkpoint step {step} is damaged ({problem or 'on another rank'})")
    raise AlignError(f"{checkpoints}: no readable checkpoint ({'; '.join(problems)}); --overwrite starts over")


def _commit_or_none(checkpoints: Path, step: int) -> dict | None:
    try:
        return train_state.read_commit(train_state.step_dir(checkpoints, step))
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
    train_state.set_rng_state(state["rng"])


# -- steps ---------------------------------------------------------------------------------------------------------


def supervised_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that are predicted and learnt: labels after the first position (the model predicts the next token)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def micro_batch_loss(model: VisionLLM, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the micro-batch's supervised tokens, and their number."""
    logits = model(inputs["input_ids"], inputs["attention_mask"], inputs["image_mask"], inputs["features"]).logits
    labels = inputs["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, supervised_count(inputs["labels"])


def mute_broken_features(run: Run, data: StageData, samples: list, ids: np.ndarray, view: int, size: int) -> int:
    """Samples whose store rows hold NaN or infinity (a damaged store, a writer that produced NaN) are kept in
    their place, so every rank's micro-batches stay in step, but learn nothing and see zeros; each rank checks
    the rows it reads, all ranks learn which, rank 0 logs them as rejects. Returns how many were muted."""
    broken = torch.zeros(len(samples), dtype=torch.float64)
    for start in range(size * run.ranks.rank, len(samples), size * run.ranks.world):
        for i in range(start, min(start + size, len(samples))):
            broken[i] = float(any(not np.isfinite(data.rows.get(r)[view]).all() for r in samples[i].rows))
    if run.ranks.world > 1:
        torch.distributed.all_reduce(broken)
    for i in broken.nonzero().flatten().tolist():
        sample = samples[i]
        samples[i] = replace(sample, labels=[IGNORE_INDEX] * len(sample.labels), rows=[-1] * len(sample.rows))
        if data.rejects is not None:
            data.rejects.add(data.cache.where(int(ids[i])), "non-finite features in the feature store")
    return int(broken.count_nonzero())


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the LLM computes in under autocast for a recipe's precision (None: fp32, no autocast)."""
    return TORCH_DTYPES[precision] if precision != "fp32" else None


def train_step(run: Run, stage: Stage, data: StageData, engine, epoch: int,
               step: int) -> tuple[StepTotals, float | None]:
    """One optimizer step: this rank's micro-batches of global batch `step`, normalised as the recipe says; with
    the gradient norm read from `.grad` before the update (where DeepSpeed reports none)."""
    ids = data.order.sample_ids(epoch, step)
    samples = data.cache.samples(ids, epoch)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))  # micro-batches pad little
    samples, ids = [samples[i] for i in order], ids[order]
    size = stage.micro_batch_size
    views = run.row_shape[0]
    # View 0 is the plain image; training views (if extracted) rotate, one per epoch.
    view = 1 + epoch % (views - 1) if views > 1 else 0
    muted = mute_broken_features(run, data, samples, ids, view, size)
    global_tokens = sum(int(np.count_nonzero(np.asarray(s.labels[1:]) != IGNORE_INDEX)) for s in samples)
    micro = [samples[i:i + size] for i in range(0, len(samples), size)]
    amp = autocast_dtype(run.recipe.runtime.precision)
    totals, own_norm = StepTotals(muted=muted if run.main else 0), None  # counted once in the sum over ranks
    mine = micro[run.ranks.rank::run.ranks.world]
    for k, batch in enumerate(mine):
        inputs = {k: v.to(run.device) for k, v in collate(batch, data.rows, view, data.pad_id).items()}
        with torch.autocast(run.device.type, dtype=amp) if amp else nullcontext():
            loss_sum, tokens = micro_batch_loss(run.model, inputs)
        if stage.loss == "token":
            # DeepSpeed averages gradients over ranks: scaling by the world size leaves Σ loss / global tokens.
            engine.backward(loss_sum * run.ranks.world / max(1, global_tokens), scale_wrt_gas=False)
            totals.loss_sum += loss_sum.item()
        else:
            mean = loss_sum / tokens.clamp(min=1)
            engine.backward(mean)
            totals.loss_sum += mean.item()
        totals.supervised += int(tokens)
        totals.micro_batches += 1
        totals.real_tokens += int(inputs["attention_mask"].sum())
        totals.padded_tokens += inputs["attention_mask"].numel()
        if k == len(mine) - 1:  # the boundary: gradients are whole (and reduced over ranks) until the step
            own_norm = gradient_norm(run.model.trainable_parameters())
        engine.step()
    return totals, own_norm


def run_steps(run: Run, stage: Stage, data: StageData, engine, scheduler, start: int, total: int, stats: Stats,
              show_progress: bool, metrics) -> None:
    """Optimizer steps `start`..`total`, with metrics, interval checkpoints and Ctrl-C handled at step ends."""
    runtime = run.recipe.runtime
    checkpoints = runtime.output_dir / stage.name / CHECKPOINTS
    columns = progress_columns(f"[bold]{stage.name}[/bold]", "loss {task.fields[loss]}")
    with StopOnInterrupt() as stop, Progress(*columns, disable=not (show_progress and run.main)) as bar:
        task = bar.add_task(stage.name, total=total, completed=start, loss="-")
        for step in range(start, total):
            epoch = step // data.steps_per_epoch
            started = time.perf_counter()
            lr = engine.get_lr()[0]  # the rate this step applies (the schedule moves on after it)
            totals, own_norm = train_step(run, stage, data, engine, epoch, step % data.steps_per_epoch)
            totals.stop = int(stop.requested)
            totals = totals.reduce(run.ranks)
            applied = engine.was_step_applied()
            if applied:
                stats.applied += 1
            else:
                stats.skipped.append(step + 1)  # an fp16 overflow: DeepSpeed skipped the update
            seconds = time.perf_counter() - started
            loss = (totals.loss_sum / max(1, totals.supervised) if stage.loss == "token"
                    else totals.loss_sum / max(1, totals.micro_batches))
            stats.last_loss = loss
            stats.muted += totals.muted
            norm = engine.get_global_grad_norm()
            record = {
                "stage": stage.name, "step": step + 1, "epoch": epoch, "loss": loss, "lr": lr,
                "grad_norm": _float(norm) if norm is not None else own_norm, "skipped": not applied,
                "supervised_tokens": totals.supervised, "muted_samples": totals.muted,
                "samples_per_second": stage.global_batch_size / seconds,
                "tokens_per_second": totals.real_tokens / seconds,
                "padding_efficiency": totals.real_tokens / max(1, totals.padded_tokens),
                "peak_memory_mb": peak_memory_mb(run.device),
            }
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(task, advance=1, loss=f"{loss:.4f}")
            if totals.stop:
                # Ctrl-C (on any rank) finishes the running step, so the checkpoint sits on a step boundary.
                save_checkpoint(run, engine, scheduler, checkpoints, step + 1, stats)
                raise KeyboardInterrupt
            if (step + 1) % runtime.save_interval == 0 and step + 1 < total:
                save_checkpoint(run, engine, scheduler, checkpoints, step + 1, stats)


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


# -- a stage -------------------------------------------------------------------------------------------------------


def train_stage(run: Run, stage: Stage, previous: Path | None, resume: bool, show_progress: bool) -> Path:
    """Train one stage to its end (or resume it); returns its adapter directory."""
    runtime = run.recipe.runtime
    stage_dir = runtime.output_dir / stage.name
    adapter_dir = stage_dir / ADAPTER_DIR
    if resume and run.ranks.decide(lambda: (stage_dir / STAGE_DONE).is_file()):
        return adapter_dir
    data = stage_data(run, stage, show_progress, resume)
    total = stage.epochs * data.steps_per_epoch
    engine, scheduler = make_engine(run, stage, previous, total)
    checkpoints = stage_dir / CHECKPOINTS
    start, stats = restore(run, engine, scheduler, checkpoints) if resume else (0, Stats())
    with ExitStack() as files:
        metrics = files.enter_context((runtime.output_dir / METRICS).open("a")) if run.main else None
        if data.rejects is not None:
            files.callback(data.rejects.close)
        run_steps(run, stage, data, engine, scheduler, start, total, stats, show_progress, metrics)
    finish_stage(run, stage, data, engine, total, stats, show_progress)
    return adapter_dir


def finish_stage(run: Run, stage: Stage, data: StageData, engine, total: int, stats: Stats,
                 show_progress: bool) -> None:
    """Write the stage's adapter and summary (rank 0)."""
    state = projector_state(engine, run.recipe.runtime.zero_stage)
    share = frozen_share(run)
    stage_dir = run.recipe.runtime.output_dir / stage.name
    if not run.main:
        return
    save_adapter(stage_dir / ADAPTER_DIR, adapter_config(run, stage, total, data.template), state)
    meta = data.cache.meta
    summary = {"stage": stage.name, "steps": total, "applied_steps": stats.applied, "skipped_steps": stats.skipped,
               "samples": len(data.cache), "truncated": meta["truncated"], "rejected": meta["rejected"],
               "rejects_by_reason": meta["rejects_by_reason"], "prompts_per_epoch": meta["prompts_per_epoch"],
               "muted_samples": stats.muted, "final_loss": stats.last_loss, "frozen_parameters": share}
    write_atomic(stage_dir / STAGE_DONE, json.dumps(summary, indent=1))
    if show_progress:
        print(f"{stage.name}: {total} steps on {len(data.cache)} samples ({meta['truncated']} truncated, "
              f"{meta['rejected']} rejected), final loss {stats.last_loss}", flush=True)


# -- a run ---------------------------------------------------------------------------------------------------------


def frozen_llm_ds_config(run: Run) -> dict:
    """DeepSpeed's ZeRO-3 settings for the frozen LLM: partitioned across ranks, gathered layer by layer."""
    runtime = run.recipe.runtime
    on_gpu = run.device.type == "cuda"
    zero = {"stage": 3}
    if runtime.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "bf16": {"enabled": runtime.precision == "bf16" and on_gpu},
            "fp16": {"enabled": runtime.precision == "fp16" and on_gpu}, "steps_per_print": 10**9}


def load_run_llm(run: Run) -> torch.nn.Module:
    """The frozen LLM: whole on every rank, or under `zero_stage: 3` partitioned while it loads (each rank holds
    about 1/world of it, optionally in CPU memory) and gathered layer by layer in forward and backward."""
    runtime = run.recipe.runtime
    partition = runtime.zero_stage == 3
    if partition and runtime.quantization != "none":
        raise AlignError("zero_stage 3 partitions the frozen LLM, and 8/4-bit weights cannot be partitioned: use "
                         "quantization none with ZeRO-3, or zero_stage 0-2 with quantization")
    if runtime.offload_params and not partition:
        raise AlignError("runtime.offload_params moves ZeRO-3 partitions to CPU memory: it needs zero_stage 3")
    keep_alive = None
    if partition:
        from transformers.integrations import HfDeepSpeedConfig

        # transformers loads under deepspeed.zero.Init while this object lives: no rank ever holds the whole model.
        keep_alive = HfDeepSpeedConfig(frozen_llm_ds_config(run) | {"train_batch_size": run.ranks.world})
    dtype = "fp32" if run.device.type == "cpu" and runtime.quantization == "none" else runtime.precision
    with remote_code_opt_in("runtime.trust_remote_code: true in the recipe (or --set runtime.trust_remote_code=true)"):
        llm = load_frozen_llm(
            run.spec, run.recipe.backbone.model, dtype=dtype, quantization=runtime.quantization,
            trust_remote_code=runtime.trust_remote_code, gradient_checkpointing=runtime.gradient_checkpointing,
            device=None if partition else run.device,
        )
    if partition:
        import deepspeed

        # An engine without optimizer: it installs the hooks that gather each layer's weights when it runs.
        run.llm_engine = deepspeed.initialize(model=llm, config=keep_alive.config)[0]
    return llm


def frozen_share(run: Run) -> dict:
    """How many frozen LLM parameters there are, and how many each rank holds."""
    params = list(run.model.llm.parameters())
    total = sum(int(np.prod(full_shape(p))) for p in params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    per_rank = [0] * run.ranks.world
    per_rank[run.ranks.rank] = held
    return {"total": total, "held_per_rank": run.ranks.sum(per_rank)}



@dataclass
class TrainOutcome:
    """Each stage's adapter directory, and the model as trained (frozen LLM + last projector engine)."""

    adapters: list[Path]
    model: VisionLLM


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


def train(recipe_path: Path, output: Path | None = None, resume: bool = False, overrides: list[str] = (),
          show_progress: bool = True, allow_recipe_change: bool = False, last_in_process: bool = False,
          overwrite: bool = False) -> TrainOutcome:
    """Run every stage of a recipe in order; `last_in_process` ends the process group afterwards, also on errors
    (DeepSpeed keeps its groups for the life of the process, so a process that trains again keeps it)."""
    recipe = load_recipe(recipe_path, list(overrides))
    if output is not None:
        recipe.runtime.output_dir = output.resolve()
    ranks = start_ranks(always=True, deepspeed=True)
    try:
        with ExitStack() as held:
            # Rank 0 holds the output folder for the whole job and decides whether it may be written into.
            ranks.decide(lambda: claim_output(recipe, held, resume, overwrite))
            return _train(recipe, ranks, resume, show_progress, allow_recipe_change)
    finally:
        restore_torch_linear()
        if last_in_process and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def restore_torch_linear() -> None:
    """Put torch's own `torch.nn.functional.linear` back. Loading under ZeRO-3 (deepspeed.zero.Init) replaces it with
    DeepSpeed's memory-efficient linear for the rest of the process ("persists unless manually reset"); a run keeps
    it while it trains and leaves the process as it found it."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


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


def _train(recipe: Recipe, ranks: Ranks, resume: bool, show_progress: bool, allow_recipe_change: bool) -> TrainOutcome:
    for stage in recipe.stages:  # before anything loads or trains: a later stage must not fail after hours
        if problem := stage.split_problem(ranks.world):
            raise SharedError(problem)
    device = local_device()
    random.seed(recipe.runtime.seed)
    np.random.seed(recipe.runtime.seed)
    spec = get_backbone(recipe.backbone.name)
    store_meta = ranks.decide(lambda: FeatureStore.read_meta(recipe.features))
    output = recipe.runtime.output_dir
    if resume:
        ranks.decide(lambda: check_resumed_recipe(output, recipe, allow_recipe_change))
    run = Run(recipe, ranks, device, spec, store_meta, shared_output=ranks.sees_rank0_files(output))
    if not run.shared_output and run.main:
        print(f"note: {output} is not shared by every node; each node keeps its own render cache and checkpoints, "
              "adapters are written on this node", flush=True)
    run.model = VisionLLM(load_run_llm(run), torch.nn.Identity())  # each stage puts its own projector engine here
    if run.main:
        output.mkdir(parents=True, exist_ok=True)
        write_atomic(output / RECIPE_JSON, recipe.model_dump_json(indent=2))
    adapters, previous = [], None
    for stage in recipe.stages:
        previous = train_stage(run, stage, previous, resume, show_progress)
        adapters.append(previous)
        ranks.barrier()
    return TrainOutcome(adapters, run.model)
