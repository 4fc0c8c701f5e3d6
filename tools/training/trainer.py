"""`align train`: run a recipe's stages in order, training only the projector under a DeepSpeed engine.

A stage runs in named steps: its data (the render cache and the order of global batches), its engine (the
projector, its optimizer and schedule under DeepSpeed), resuming (align's own pickle-free training state), the
optimizer steps, and finishing (adapter, summary). Every choice read from a file is taken on rank 0 and shared.
Beside it: `run` (what stages share, a stage's data), `train_state` (checkpoints and resuming), `frozen_llm`
(loading the frozen LLM, under ZeRO-3 partitioned), `output_folder` (holding the output folder, the resume check).

The loss of a global batch is the sum of its supervised tokens' cross-entropy divided by their number over the
whole global batch, so the adapter does not depend on the micro-batch size or the number of processes
(`loss: micro_batch_mean` keeps MiniGPT-4's mean of micro-batch means for exact reproductions).
"""

import json
import math
import random
import resource
import signal
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from align.adapters.adapter_files import AdapterConfig, inference_template, load_adapter, save_adapter
from align.adapters.projector import build_projector, embedding_statistics, match_embeddings
from align.adapters.vision_llm import VisionLLM
from align.backbones.dtypes import TORCH_DTYPES
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.constants import ADAPTER_DIR, CHECKPOINTS, METRICS, RECIPE_JSON, STAGE_DONE
from align.errors import SharedError
from align.files import WriteError, read_json_object, write_atomic
from align.templates import IGNORE_INDEX
from align.words import counted
from align.tools.feature_store import FeatureStore
from align.tools.runtime import Ranks, local_device, progress_columns, start_ranks
from align.tools.training.frozen_llm import frozen_share, load_run_llm, restore_torch_linear
from align.tools.training.metrics_log import MetricsLog, check_reporters
from align.tools.training.output_folder import check_resumed_recipe, claim_output, saved_recipe, trim_metrics
from align.tools.training.recipe import Recipe, Stage, load_recipe
from align.tools.pipeline import Pipeline
from align.tools.training.run import Run, StageData, ValidationData, stage_data, validation_data
from align.tools.training.train_state import Stats, diverged, projector_state, restore, save_checkpoint
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
    """Turns Ctrl-C, and SIGTERM (a timeout, SLURM, Kubernetes, systemd stopping the job), into a request that the
    training loop honours at the end of the running step: it saves a checkpoint and stops."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in self.SIGNALS}
        return self

    def _request(self, signum, frame) -> None:
        if self.requested:  # a second one stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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


# -- data ----------------------------------------------------------------------------------------------------------


# -- engine --------------------------------------------------------------------------------------------------------


def parameter_groups(projector: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight matrices decay, biases and norm scales do not (as LAVIS / MiniGPT-4's runner)."""
    decay = [p for p in projector.parameters() if p.ndim >= 2]
    plain = [p for p in projector.parameters() if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


# Samples whose store rows a new projector is matched on (the first ones of the stage, the same on every rank).
MATCH_SAMPLES = 256


def llm_embedding_statistics(run: Run) -> tuple[torch.Tensor, float]:
    """The frozen LLM's input embedding statistics (`embedding_statistics`), the table gathered once under ZeRO-3."""
    weight = run.model.llm.get_input_embeddings().weight
    if getattr(weight, "ds_id", None) is None:
        return embedding_statistics(weight.detach())
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight]):
        return embedding_statistics(weight.detach())


def matched_projector(run: Run, projector: torch.nn.Module, data: StageData) -> torch.nn.Module:
    """`projector` rescaled to the LLM's embeddings on the view-0 rows of the stage's first samples."""
    samples = data.cache.samples(np.arange(min(MATCH_SAMPLES, len(data.cache))), 0)
    rows = [data.rows.get(r)[0] for sample in samples for r in sample.rows]
    rows = [row for row in rows if np.isfinite(row).all()]  # a damaged row must not set the scale
    if not rows:
        return projector
    features = torch.from_numpy(np.concatenate(rows).astype(np.float32))
    mean, spread = llm_embedding_statistics(run)
    match_embeddings(projector, features, mean.cpu(), spread)
    return projector


def initial_projector(run: Run, stage: Stage, previous: Path | None, data: StageData) -> torch.nn.Module:
    """A new projector (matched to the LLM's embeddings unless the recipe says otherwise), or the previous stage's /
    a given adapter loaded into it (read by rank 0, checked, shared)."""
    torch.manual_seed(run.recipe.runtime.seed)
    projector = build_projector(run.recipe.projector, run.row_shape[-1], run.spec.hidden_size)
    source = previous if stage.init_from == "previous" else (Path(stage.init_from) if stage.init_from else None)
    if source is None:
        return matched_projector(run, projector, data) if run.recipe.projector_init == "matched" else projector

    def read() -> dict:
        config, state = load_adapter(source)
        config.check_fits(backbone=run.spec.name, hidden_size=run.spec.hidden_size, vocab_size=run.spec.vocab_size,
                          template=config.template, num_query_tokens=run.row_shape[1],
                          encoder_fingerprint=run.store_meta["encoder_fingerprint"], where=str(source))
        return {k: v.numpy() for k, v in state.items()}

    state = run.ranks.decide(read)
    projector.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return projector


def make_engine(run: Run, stage: Stage, previous: Path | None, total: int, data: StageData):
    """The projector under DeepSpeed with AdamW and the stage's schedule; returns (engine, scheduler)."""
    import deepspeed

    runtime = run.recipe.runtime
    micro_per_rank = stage.global_batch_size // (stage.micro_batch_size * run.ranks.world)
    projector = initial_projector(run, stage, previous, data)
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


def adapter_config(run: Run, stage: Stage, step: int, template: str) -> AdapterConfig:
    """The metadata that binds this stage's projector to its backbone, template and encoder."""
    return AdapterConfig.for_backbone(
        run.spec, projector=run.recipe.projector, in_features=run.row_shape[-1], template=template,
        num_query_tokens=run.row_shape[1], encoder_fingerprint=run.store_meta["encoder_fingerprint"],
        stage=stage.name, step=step,
    )


# -- resume --------------------------------------------------------------------------------------------------------


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


def forward_loss(run: Run, batch: list, rows, view: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One micro-batch through the model in the run's precision: its summed token loss, supervised tokens, and the
    inputs it was collated into."""
    inputs = {k: v.to(run.device) for k, v in collate(batch, rows, view, pad_id).items()}
    amp = autocast_dtype(run.recipe.runtime.precision)
    with torch.autocast(run.device.type, dtype=amp) if amp else nullcontext():
        loss_sum, tokens = micro_batch_loss(run.model, inputs)
    return loss_sum, tokens, inputs


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
    totals, own_norm = StepTotals(muted=muted if run.main else 0), None  # counted once in the sum over ranks
    mine = micro[run.ranks.rank::run.ranks.world]
    for k, batch in enumerate(mine):
        loss_sum, tokens, inputs = forward_loss(run, batch, data.rows, view, data.pad_id)
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


BEST_DIR, BEST_JSON = "best", "best.json"  # STAGE/best/adapter and the step, metric and value it was kept at


def validation_loss(run: Run, stage: Stage, held_out: ValidationData) -> float:
    """The loss per supervised token over every held-out sample (plain image view), computed without gradients and
    shared over ranks; every rank runs as many forward passes (ZeRO-3 gathers weights in each)."""
    samples = held_out.cache.samples(np.arange(len(held_out.cache)), 0)
    samples.sort(key=lambda sample: len(sample.input_ids))
    size = stage.micro_batch_size
    micro = [samples[i:i + size] for i in range(0, len(samples), size)]
    rounds = -(-len(micro) // run.ranks.world)
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for k in range(rounds):
            index = run.ranks.rank + k * run.ranks.world
            batch = micro[index] if index < len(micro) else micro[0]  # an idle rank's pass is not counted
            loss_sum, count, _ = forward_loss(run, batch, held_out.rows, 0, held_out.pad_id)
            if index < len(micro):
                loss, tokens = loss + float(loss_sum), tokens + int(count)
    loss, tokens = run.ranks.sum([loss, tokens])
    return loss / max(1, tokens)


def keep_if_best(run: Run, stage: Stage, engine, step: int, scores: dict, template: str) -> None:
    """With `eval.keep_best`, the adapter of the best score so far (the lowest val_loss, the highest benchmark
    score) in STAGE/best; rank 0's scores decide (a benchmark is scored there) and rank 0 writes."""
    metric = stage.eval.keep_best
    best_dir = run.recipe.runtime.output_dir / stage.name / BEST_DIR
    value, record = run.ranks.decide(lambda: (scores.get(metric), read_json_object(best_dir / BEST_JSON)
                                              if (best_dir / BEST_JSON).is_file() else None))
    if value is None:
        raise SharedError(f"stage {stage.name}: keep_best {metric} is not among the scores ({', '.join(scores)})")
    sign = 1 if metric == "val_loss" else -1  # a loss is better lower, a benchmark score higher
    if record is not None and sign * record.get("value", sign * math.inf) <= sign * value:
        return
    state = projector_state(engine, run.recipe.runtime.zero_stage)  # every rank: ZeRO-3 gathers it
    if run.main:
        save_adapter(best_dir / ADAPTER_DIR, adapter_config(run, stage, step, template), state)
        write_atomic(best_dir / BEST_JSON, json.dumps({"step": step, "metric": metric, "value": value}))


class BenchmarkAsker:
    """A stage's eval.benchmark, asked through the run's evaluator of the projector as it is at a step; the
    tokenizer and template are loaded once per stage, the answers and scores go to STAGE/eval/stepNNNNNNNN."""

    def __init__(self, run: Run, stage: Stage, data: StageData):
        self.run, self.stage, self.data = run, stage, data
        self.model_dir = Path(run.recipe.backbone.model or run.spec.model_path)
        self.tokenizer = backbone_tokenizer(run.spec, self.model_dir)

    def __call__(self, step: int) -> dict:
        """The benchmark's scores after `step`, as {"<kind>/<metric>": value} (rank 0's)."""
        run, stage, benchmark = self.run, self.stage, self.stage.eval.benchmark
        config = adapter_config(run, stage, step, self.data.template)
        template = inference_template(config, run.spec, self.tokenizer, self.model_dir, f"stage {stage.name}")
        pipeline = Pipeline(config, run.model, self.tokenizer, None, run.spec, run.device, template)
        out = run.recipe.runtime.output_dir / stage.name / "eval" / f"step{step:08d}"
        training = run.model.training
        run.model.eval()
        try:
            return run.evaluator(benchmark.kind, dict(benchmark.files), benchmark.limit, pipeline, out, run.ranks,
                                 run.recipe.features, prompt=benchmark.prompt, max_new_tokens=benchmark.max_new_tokens,
                                 batch_size=benchmark.batch_size)
        finally:
            run.model.train(training)


def run_steps(run: Run, stage: Stage, data: StageData, engine, scheduler, start: int, total: int, stats: Stats,
              show_progress: bool, metrics: MetricsLog | None, held_out: ValidationData | None = None) -> None:
    """Optimizer steps `start`..`total`, with metrics, interval checkpoints and Ctrl-C handled at step ends."""
    runtime = run.recipe.runtime
    checkpoints = runtime.output_dir / stage.name / CHECKPOINTS
    ask_benchmark = BenchmarkAsker(run, stage, data) if stage.eval and stage.eval.benchmark else None
    columns = progress_columns(f"[bold]{stage.name}[/bold]", "loss {task.fields[loss]}",
                               "{task.fields[samples]} samples/s", unit="steps")
    with StopOnInterrupt() as stop, Progress(*columns, disable=not (show_progress and run.main)) as bar:
        task = bar.add_task(stage.name, total=total, completed=start, loss="-", samples="-")
        if ask_benchmark is not None and stage.eval.at_start and start == 0:
            ask_benchmark(0)
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
            if not math.isfinite(loss):
                diverged(checkpoints, step + 1, f"the loss is {loss}")
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
            every = stage.eval.every if stage.eval else 0
            if stage.eval and (step + 1 == total or (every and (step + 1) % every == 0)):
                record["eval"] = {}
                if held_out is not None:
                    record["eval"]["val_loss"] = validation_loss(run, stage, held_out)
                if stage.eval.benchmark:
                    record["eval"].update(ask_benchmark(step + 1))
                if stage.eval.keep_best:
                    keep_if_best(run, stage, engine, step + 1, record["eval"], data.template)
            if metrics is not None:
                metrics.write(record)
            bar.update(task, advance=1, loss=f"{loss:.4f}", samples=f"{record['samples_per_second']:.3g}")
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
        if show_progress and run.main:
            print(f"stage {stage.name} is finished: keeping {adapter_dir}", flush=True)
        return adapter_dir
    data = stage_data(run, stage, show_progress, resume)
    total = stage.epochs * data.steps_per_epoch
    engine, scheduler = make_engine(run, stage, previous, total, data)
    checkpoints = stage_dir / CHECKPOINTS
    start, stats = restore(run, engine, scheduler, checkpoints) if resume else (0, Stats())
    if resume and run.main:
        trim_metrics(runtime.output_dir / METRICS, stage.name, start)
    key = data.cache.meta["key"]
    if stats.data not in (None, key):
        raise SharedError(f"stage {stage.name}: its data changed since the checkpoint of step {start} (the manifests, "
                          f"the tokenizer, the template or the feature store: render cache {stats.data} → {key}); "
                          "resume with the data it started with, or --overwrite to start over")
    stats.data = key
    if resume and show_progress and run.main:
        print(f"resuming stage {stage.name} at step {start} of {total}" if start else
              f"starting stage {stage.name}: no checkpoint to resume from", flush=True)
    with ExitStack() as files:
        metrics = files.enter_context(MetricsLog(runtime.output_dir, runtime.report_to)) if run.main else None
        if data.rejects is not None:
            files.callback(data.rejects.close)
        held_out = validation_data(run, stage, data.pad_id, show_progress)
        run_steps(run, stage, data, engine, scheduler, start, total, stats, show_progress, metrics, held_out)
    finish_stage(run, stage, data, engine, total, stats, show_progress)
    return adapter_dir


def finish_stage(run: Run, stage: Stage, data: StageData, engine, total: int, stats: Stats,
                 show_progress: bool) -> None:
    """Write the stage's adapter and summary (rank 0)."""
    state = projector_state(engine, run.recipe.runtime.zero_stage)
    stage_dir = run.recipe.runtime.output_dir / stage.name
    if not all(torch.isfinite(t).all() for t in state.values()):
        diverged(stage_dir / CHECKPOINTS, total, "the projector's weights are not finite")
    share = frozen_share(run)
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
        loss = "none" if stats.last_loss is None else f"{stats.last_loss:.4f}"
        print(f"{stage.name}: {counted(total, 'step')} on {counted(len(data.cache), 'sample')} "
              f"({meta['truncated']} truncated, {meta['rejected']} rejected), final loss {loss}", flush=True)


# -- a run ---------------------------------------------------------------------------------------------------------


@dataclass
class OpenStage:
    """A recipe's stage built exactly as `align train` builds it (frozen LLM, render cache, data order, projector
    engine), stepped by the caller: `align bench train` times its steps against plain loops."""

    run: Run
    stage: Stage
    data: StageData
    engine: object

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the LLM computes in (None: fp32)."""
        return autocast_dtype(self.run.recipe.runtime.precision)

    def step(self, epoch: int, step: int) -> StepTotals:
        """One optimizer step on global batch `step` of `epoch`, as training takes it."""
        return train_step(self.run, self.stage, self.data, self.engine, epoch, step)[0]


def open_stage(recipe: Recipe, steps: int) -> OpenStage:
    """The recipe's first stage, ready for `steps` optimizer steps (its files under the recipe's output folder)."""
    stage = recipe.stages[0]
    run = Run(recipe, start_ranks(always=True, deepspeed=True), local_device(), get_backbone(recipe.backbone.name),
              FeatureStore.read_meta(recipe.features))
    run.model = VisionLLM(load_run_llm(run), torch.nn.Identity())
    data = stage_data(run, stage, False)
    engine, _ = make_engine(run, stage, None, steps, data)
    return OpenStage(run, stage, data, engine)


@dataclass
class TrainOutcome:
    """Each stage's adapter directory, and the model as trained (frozen LLM + last projector engine)."""

    adapters: list[Path]
    model: VisionLLM


def train(recipe_path: Path | None, output: Path | None = None, resume: bool = False, overrides: list[str] = (),
          show_progress: bool = True, allow_recipe_change: bool = False, last_in_process: bool = False,
          overwrite: bool = False, evaluator=None) -> TrainOutcome:
    """Run every stage of a recipe in order (resuming without one: the run's own saved recipe in `output`);
    `evaluator` answers stages' eval.benchmark (`align train` passes align eval's); `last_in_process` ends the
    process group afterwards, also on errors (DeepSpeed keeps its groups for the life of
    the process, so a process that trains again keeps it)."""
    if recipe_path is None:
        recipe_path = saved_recipe(output, resume)
    recipe = load_recipe(recipe_path, list(overrides))
    if output is not None:
        recipe.runtime.output_dir = output.resolve()
    ranks = start_ranks(always=True, deepspeed=True)
    try:
        with ExitStack() as held:
            # Rank 0 holds the output folder for the whole job and decides whether it may be written into.
            ranks.decide(lambda: claim_output(recipe, held, resume, overwrite))
            try:
                return _train(recipe, ranks, resume, show_progress, allow_recipe_change, evaluator)
            except WriteError as exc:  # what is finished is kept: the run continues once there is room
                raise WriteError(f"{exc}; then continue the run with `align train --resume --output "
                                 f"{recipe.runtime.output_dir}`") from None
    finally:
        restore_torch_linear()
        if last_in_process and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(recipe: Recipe, ranks: Ranks, resume: bool, show_progress: bool, allow_recipe_change: bool,
           evaluator=None) -> TrainOutcome:
    check_reporters(recipe.runtime.report_to)
    for stage in recipe.stages:
        if stage.eval and stage.eval.benchmark:
            if evaluator is None:
                raise SharedError(f"stage {stage.name}: eval.benchmark needs an evaluator: run it with `align train`")
            if missing := stage.eval.benchmark.missing():
                raise SharedError(f"stage {stage.name}: eval.benchmark's {', '.join(map(str, missing))} does not exist")
            if recipe.runtime.zero_stage == 3:  # answers of different lengths would run different forward passes
                raise SharedError(f"stage {stage.name}: eval.benchmark generates answers, which ZeRO-3's gathered "
                                  "weights cannot do rank by rank: use zero_stage 2 or an eval of data only")
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
    run = Run(recipe, ranks, device, spec, store_meta, shared_output=ranks.sees_rank0_files(output),
              evaluator=evaluator)
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
