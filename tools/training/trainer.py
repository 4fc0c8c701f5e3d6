"""`align train`: run a recipe's stages in order, training only the projector under a DeepSpeed engine.

The DeepSpeed engine wraps the projector alone (the frozen LLM stays outside it), so every ZeRO stage partitions
only what is trained, checkpoints never hold frozen weights, and a previous stage's adapter is loaded into the plain
projector before the engine exists (which is what makes ZeRO-3 stage chaining work).
"""

import json
import math
import random
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from align.adapters.adapter_files import AdapterConfig, load_adapter, save_adapter
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones.dtypes import TORCH_DTYPES
from align.backbones.llm import load_frozen_llm, remote_code_opt_in
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.spec import BackboneSpec
from align.constants import ADAPTER_DIR, CHECKPOINTS, LATEST, METRICS, RECIPE_JSON, REJECTS, STAGE_DONE
from align.errors import AlignError
from align.backbones.chat_templates import template_for
from align.tools.feature_store import FeatureStore
from align.tools.training.recipe import Recipe, Stage, load_recipe
from align.tools.rejects import RejectLog
from align.tools.runtime import local_device, progress_columns, start_ranks
from align.tools.training.training_data import BatchPlan, build_samples, collate



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
    """What every stage shares: recipe, ranks, backbone, tokenizer, store, frozen LLM."""

    recipe: Recipe
    rank: int
    world: int
    device: torch.device
    spec: BackboneSpec
    store: FeatureStore
    model: VisionLLM | None = None

    @property
    def main(self) -> bool:
        """True on the process that logs and writes adapters."""
        return self.rank == 0


def adapter_config(run: Run, stage: Stage, step: int, template: str) -> AdapterConfig:
    """The metadata that binds this stage's projector to its backbone, template and encoder."""
    return AdapterConfig.for_backbone(
        run.spec, projector=run.recipe.projector, in_features=run.store.row_shape[-1], template=template,
        num_query_tokens=run.store.row_shape[1], encoder_fingerprint=run.store.meta["encoder_fingerprint"],
        stage=stage.name, step=step,
    )


def _projector_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full projector weights on every rank (gathered from ZeRO-3 partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    context = deepspeed.zero.GatheredParameters(params) if zero_stage == 3 else nullcontext()
    with context:
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def initial_projector(run: Run, stage: Stage, previous: Path | None, template: str) -> torch.nn.Module:
    """A new projector, or the previous stage's / a given adapter loaded into it (checked to fit)."""
    projector = build_projector(run.recipe.projector, run.store.row_shape[-1], run.spec.hidden_size)
    source = previous if stage.init_from == "previous" else (Path(stage.init_from) if stage.init_from else None)
    if source is not None:
        config, state = load_adapter(source)
        config.check_fits(backbone=run.spec.name, hidden_size=run.spec.hidden_size, vocab_size=run.spec.vocab_size,
                          template=config.template, num_query_tokens=run.store.row_shape[1],
                          encoder_fingerprint=run.store.meta["encoder_fingerprint"], where=str(source))
        projector.load_state_dict(state)
    return projector


def train_stage(run: Run, stage: Stage, previous: Path | None, resume: bool, show_progress: bool) -> Path:
    """Train one stage to its end (or resume it); returns its adapter directory."""
    import deepspeed

    runtime = run.recipe.runtime
    stage_dir = runtime.output_dir / stage.name
    adapter_dir = stage_dir / ADAPTER_DIR
    if resume and (stage_dir / STAGE_DONE).is_file():
        return adapter_dir
    tokenizer = backbone_tokenizer(run.spec, run.recipe.backbone.model)
    template = template_for(run.spec, tokenizer, name=stage.template, model=run.recipe.backbone.model)
    rejects = RejectLog(stage_dir / REJECTS) if run.main else None
    per_source = build_samples(
        [d.manifest for d in stage.data], run.store, template, tokenizer, system=run.spec.system,
        max_length=stage.max_length, prompts=stage.prompts, seed=runtime.seed,
        rejects=rejects,  # only rank 0 logs: every rank renders the same samples
    )
    if not any(per_source):
        reasons = dict(rejects.counts) if rejects else {}
        raise AlignError(f"stage {stage.name}: no usable training samples; rejected: {reasons} "
                         f"(details in {stage_dir / 'rejects.jsonl'})")
    plan = BatchPlan(per_source, [d.ratio for d in stage.data], stage.global_batch_size, runtime.seed)
    steps_per_epoch = stage.steps_per_epoch or plan.steps_per_pass
    total = stage.epochs * steps_per_epoch
    micro_per_rank, remainder = divmod(stage.global_batch_size, stage.micro_batch_size * run.world)
    if remainder:
        raise AlignError(f"stage {stage.name}: global_batch_size {stage.global_batch_size} does not split into "
                         f"micro-batches of {stage.micro_batch_size} over {run.world} process(es)")

    torch.manual_seed(runtime.seed)
    projector = initial_projector(run, stage, previous, template.name)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=stage.lr.init_lr, weight_decay=stage.weight_decay)
    ds_config = {
        "train_batch_size": stage.global_batch_size,
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": micro_per_rank,
        "gradient_clipping": runtime.gradient_clipping,
        "zero_optimization": {"stage": runtime.zero_stage},
        "bf16": {"enabled": runtime.precision == "bf16" and run.device.type == "cuda"},
        "fp16": {"enabled": runtime.precision == "fp16" and run.device.type == "cuda"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, scheduler = deepspeed.initialize(
        model=projector, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, stage) / stage.lr.init_lr),
    )
    run.model.projector = engine
    run.model.check_frozen()

    start = 0
    checkpoints = stage_dir / CHECKPOINTS
    if resume and (checkpoints / LATEST).is_file():
        _, client = engine.load_checkpoint(str(checkpoints))
        start = client["step"]
        torch.set_rng_state(client["torch_rng"])
    views = run.store.row_shape[0]

    def save(step: int) -> None:
        engine.save_checkpoint(str(checkpoints), tag=f"step{step}",
                               client_state={"step": step, "torch_rng": torch.get_rng_state()})
        state = _projector_state(engine, runtime.zero_stage)
        if run.main:
            save_adapter(adapter_dir, adapter_config(run, stage, step, template.name), state)

    metrics = (runtime.output_dir / METRICS).open("a") if run.main else None
    amp = TORCH_DTYPES[runtime.precision] if runtime.precision != "fp32" else None
    columns = progress_columns(f"[bold]{stage.name}[/bold]", "loss {task.fields[loss]}")
    step = start
    with StopOnInterrupt() as stop, Progress(*columns, disable=not (show_progress and run.main)) as bar:
        task = bar.add_task(stage.name, total=total, completed=start, loss="-")
        for step in range(start, total):
            epoch = step // steps_per_epoch
            # View 0 is the plain image; training views (if extracted) rotate, one per epoch.
            view = 1 + epoch % (views - 1) if views > 1 else 0
            batch = plan.batch(epoch, step % steps_per_epoch)
            micro = [batch[i:i + stage.micro_batch_size] for i in range(0, len(batch), stage.micro_batch_size)]
            mine = micro[run.rank::run.world]
            started = time.perf_counter()
            losses, real, padded, own_norm = [], 0, 0, None
            for k, samples in enumerate(mine):
                inputs = {k: v.to(run.device) for k, v in collate(samples, run.store, view, tokenizer.pad_id).items()}
                autocast = torch.autocast(run.device.type, dtype=amp) if amp else nullcontext()
                with autocast:
                    loss = run.model(**inputs).loss
                engine.backward(loss)
                if k == len(mine) - 1:  # the boundary: gradients are whole (and reduced over ranks) until the step
                    own_norm = gradient_norm(run.model.trainable_parameters())
                engine.step()
                losses.append(loss.detach().float())
                real += int(inputs["attention_mask"].sum())
                padded += inputs["attention_mask"].numel()
            totals = torch.tensor([sum(losses).item(), len(losses), real, padded, stop.requested], dtype=torch.float64)
            if run.world > 1:
                torch.distributed.all_reduce(totals)
            seconds = time.perf_counter() - started
            engine_norm = engine.get_global_grad_norm()  # DeepSpeed's own where it computes one (ZeRO 1-3)
            record = {
                "stage": stage.name, "step": step + 1, "epoch": epoch, "loss": totals[0].item() / totals[1].item(),
                "lr": scheduler.get_last_lr()[0], "grad_norm": _float(engine_norm) if engine_norm is not None else own_norm,
                "samples_per_second": stage.global_batch_size / seconds, "tokens_per_second": totals[2].item() / seconds,
                "padding_efficiency": totals[2].item() / totals[3].item(), "peak_memory_mb": peak_memory_mb(run.device),
            }
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.update(task, advance=1, loss=f"{record['loss']:.4f}")
            if totals[4].item() > 0:
                # Ctrl-C (on any rank) finishes the running step, so the checkpoint sits on a step boundary.
                save(step + 1)
                raise KeyboardInterrupt
            if (step + 1) % runtime.save_interval == 0 and step + 1 < total:
                save(step + 1)
    save(total)
    if run.main:
        summary = {"stage": stage.name, "steps": total, "samples": plan.size,
                   "rejected": rejects.total if rejects else 0, "final_loss": record["loss"] if total > start else None}
        (stage_dir / STAGE_DONE).write_text(json.dumps(summary))
        if show_progress:
            bar.console.print(f"{stage.name}: {total} steps on {plan.size} samples ({summary['rejected']} rejected), "
                              f"final loss {summary['final_loss']}", highlight=False)
        rejects.close()
        metrics.close()
    return adapter_dir


def _float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


@dataclass
class TrainOutcome:
    """Each stage's adapter directory, and the model as trained (frozen LLM + last projector engine)."""

    adapters: list[Path]
    model: VisionLLM


def train(recipe_path: Path, output: Path | None = None, resume: bool = False, overrides: list[str] = (),
          show_progress: bool = True) -> TrainOutcome:
    """Run every stage of a recipe in order."""
    recipe = load_recipe(recipe_path, list(overrides))
    if output is not None:
        recipe.runtime.output_dir = output.resolve()
    ranks = start_ranks(always=True, deepspeed=True)
    rank, world = ranks.rank, ranks.world
    device = local_device()
    random.seed(recipe.runtime.seed)
    np.random.seed(recipe.runtime.seed)
    spec = get_backbone(recipe.backbone.name)
    store = FeatureStore.open(recipe.features)
    run = Run(recipe, rank, world, device, spec, store)
    with remote_code_opt_in("runtime.trust_remote_code: true in the recipe (or --set runtime.trust_remote_code=true)"):
        llm = load_frozen_llm(
            spec, recipe.backbone.model, dtype="fp32" if device.type == "cpu" and recipe.runtime.quantization == "none"
            else recipe.runtime.precision, quantization=recipe.runtime.quantization,
            trust_remote_code=recipe.runtime.trust_remote_code,
            gradient_checkpointing=recipe.runtime.gradient_checkpointing, device=device,
        )
    run.model = VisionLLM(llm, torch.nn.Identity())  # each stage puts its own projector engine here
    if run.main:
        recipe.runtime.output_dir.mkdir(parents=True, exist_ok=True)
        (recipe.runtime.output_dir / RECIPE_JSON).write_text(recipe.model_dump_json(indent=2))
    adapters, previous = [], None
    for stage in recipe.stages:
        previous = train_stage(run, stage, previous, resume, show_progress)
        adapters.append(previous)
        torch.distributed.barrier()
    return TrainOutcome(adapters, run.model)
