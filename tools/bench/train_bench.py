"""`align bench train`: training speed as ratios of two ways of doing the same work, timed in turn in one process
on the same frozen LLM and batches (an `align demo` workspace, or one derived from it at a real size: see
`bench_sizes`).

- align's own training step (the trainer's `train_step` under its DeepSpeed engine) vs a minimal hand-written loop;
- cached features vs the frozen encoder in the loop (decode, preprocess, ViT + Q-Former every step, as MiniGPT-4,
  MiniGPT4Qwen and LLaVA train), measured, and projected to real shapes by FLOPs;
- length-grouped dynamic padding vs padding every sample to max_length (padding efficiency and step time);
- feature-store random reads vs a raw sequential read of the same bytes;
- model FLOPs utilisation against a dense matmul peak measured in the same run.
"""

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from align.adapters.batch import pad_batch
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones.vision import default_compute_dtype, load_encoder
from align.backbones.vision.preprocessing import eval_view
from align.constants import STORE_SHARDS
from align.errors import AlignError
from align.templates import IGNORE_INDEX
from align.tools.results import RESULTS_DIR, device_name, write_result
from align.tools.bench.bench_sizes import BenchSize, derive_workspace, get_size, registered
from align.tools.feature_store import DTYPE
from align.tools.images import read_image
from align.tools.training.recipe import load_recipe
from align.tools.training.trainer import OpenStage, open_stage

EVA_VIT_G_FLOPS = 0.53e12  # one 224² image through EVA ViT-g + Q-Former, forward
REAL_LLM_PARAMETERS = 6.7e9  # a 7B LLM
REAL_TOKENS_PER_SAMPLE = 200  # MiniGPT-4's stage-2 samples: 32 image slots and a reply
STAGE2_SAMPLES = 12_000  # MiniGPT-4's stage-2 budget (batch 12)


def median_seconds(variants: dict[str, Callable[[int], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each variant over `rounds` rounds after a warm-up round; in each round every variant runs
    once, in turn, with the round's number, so drifting machine load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for number in range(-1, rounds):
        for name, variant in variants.items():
            started = time.perf_counter()
            variant(max(number, 0))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if number >= 0:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """Dense matmul FLOP/s on this device and dtype, measured now."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / median_seconds({"matmul": lambda _: torch.matmul(a, b)}, 5, device)["matmul"]


def bench_train(workspace: Path, *, size: str | BenchSize = "demo", steps: int = 20, batch_size: int = 16,
                out_dir: Path = RESULTS_DIR, say: Callable[[str], None] = lambda _: None) -> tuple[dict, Path]:
    """Every comparison on an `align demo` workspace at `size` (a name in SIZES, or a BenchSize); the JSON result
    and where it was written. `say` hears what is being done while it takes long."""
    workspace = Path(workspace)
    if not (workspace / "recipe.yaml").is_file() or not (workspace / "features").is_dir():
        raise AlignError(f"{workspace} is not an `align demo` workspace (run `align demo --out {workspace}` first)")
    chosen = get_size(size) if isinstance(size, str) else size
    derived = derive_workspace(workspace, chosen, say)
    say(f"timing {steps} rounds of align's step and three plain loops on the {chosen.name} models")
    with registered(derived):
        result = _measure(derived, steps, batch_size)
    result = {"bench": "train", "size": chosen.describe(), "workspace": str(workspace),
              "command": f"align bench train --workspace {workspace} --size {chosen.name} --steps {steps} "
                         f"--batch-size {batch_size}", **result}
    return write_result(result, out_dir, f"train-{chosen.name}")


@dataclass
class BenchData:
    """What every comparison shares: align's own run of the stage (its frozen LLM, data and projector engine) and
    the batches its steps take, in order."""

    workspace: Path
    align: OpenStage
    batches: list[list]

    @property
    def device(self) -> torch.device:
        """Where the models run."""
        return self.align.run.device

    @property
    def autocast(self) -> torch.dtype | None:
        """As the trainer computes: under autocast to the recipe's precision unless fp32."""
        return self.align.autocast

    @property
    def data(self):
        """The stage's data as align reads it."""
        return self.align.data

    @property
    def stage(self):
        """The stage as the recipe defines it."""
        return self.align.stage

    @property
    def run(self):
        """What align's run shares: the frozen LLM, the backbone, the store's row shape."""
        return self.align.run


def _prepare(workspace: Path, output: Path, steps: int, batch_size: int) -> BenchData:
    """align's run of the workspace's first stage at this batch size, built as `align train` builds it (its files
    under `output`)."""
    stage_name = yaml.safe_load((workspace / "recipe.yaml").read_text())["stages"][0]["name"]
    recipe = load_recipe(workspace / "recipe.yaml", [
        f"runtime.output_dir={output}", f"runtime.render_cache={workspace / 'render-cache'}",
        f"stages.{stage_name}.global_batch_size={batch_size}", f"stages.{stage_name}.micro_batch_size={batch_size}"])
    align = open_stage(recipe, steps + 1)
    data = align.data
    batches = [data.cache.samples(data.order.sample_ids(0, n % data.steps_per_epoch), 0) for n in range(steps)]
    return BenchData(workspace, align, [sorted(b, key=lambda x: len(x.input_ids)) for b in batches])


def _time_steps(bench: BenchData) -> dict:
    """Step seconds of align's own step and of a minimal hand-written loop on the same frozen LLM and batches:
    cached rows, the encoder in the loop, padding to max_length; the matmul peak in the LLM's compute dtype."""
    device, amp, data = bench.device, bench.autocast, bench.data
    llm = bench.run.model.llm
    torch.manual_seed(0)
    model = VisionLLM(llm, build_projector("linear", bench.run.row_shape[-1], bench.run.spec.hidden_size).to(device))
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    encoder = load_encoder(bench.workspace / "encoder").to(device, default_compute_dtype(device))
    manifest = Path(bench.stage.data[0].manifest)
    images = [str((manifest.parent / json.loads(line)["image"]).resolve()) for line in manifest.read_text().splitlines()]

    def step(samples, features: torch.Tensor, pad_to: int | None = None) -> None:
        if pad_to is not None:  # MiniGPT4Qwen pads every sample to max_length
            samples = [s.__class__(s.input_ids + [data.pad_id] * (pad_to - len(s.input_ids)),
                                   s.labels + [IGNORE_INDEX] * (pad_to - len(s.labels)), s.images, s.rows)
                       for s in samples]
        batch = pad_batch(samples, data.pad_id)
        inputs = [t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.image_mask)]
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            logits = model(*inputs, features.to(device)).logits
        labels = batch.labels[:, 1:].to(device).flatten()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def cached_features(samples) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(data.rows.get(r)[0], np.float32) for s in samples for r in s.rows]))

    def encoded_features(samples) -> torch.Tensor:
        picked = [images[i % len(images)] for i in range(len(samples))]
        pixels = np.stack([eval_view(read_image(p), encoder.preprocessing) for p in picked])
        with torch.no_grad():
            dtype = next(encoder.module.parameters()).dtype
            return encoder.module(torch.from_numpy(pixels).to(device, dtype)).float()

    batches, max_length = bench.batches, bench.stage.max_length
    seconds = median_seconds({
        "align": lambda n: bench.align.step(0, n % data.steps_per_epoch),
        "cached": lambda n: step(batches[n], cached_features(batches[n])),
        "in_loop": lambda n: step(batches[n], encoded_features(batches[n])),
        "padded": lambda n: step(batches[n], cached_features(batches[n]), max_length),
    }, len(batches), device)
    return {
        **seconds,
        "llm_parameters": sum(p.numel() for p in llm.parameters()),
        "peak": matmul_peak(amp or next(llm.parameters()).dtype, device),
    }


def _store_reads(bench: BenchData) -> dict:
    """Random rows through the memory maps vs the same bytes read sequentially."""
    rows, shape = bench.data.rows, bench.run.row_shape
    shard_files = sorted((bench.workspace / "features" / STORE_SHARDS).glob("*.f16"))
    total_rows = sum(f.stat().st_size for f in shard_files) // (DTYPE().itemsize * int(np.prod(shape)))
    numbers = [int(r) for r in bench.data.cache.arrays["rows"]]
    picks = np.random.default_rng(0).choice(numbers, size=min(4096, 8 * len(numbers)))
    started = time.perf_counter()
    for number in picks:
        np.asarray(rows.get(int(number)), np.float32)
    random_rate = len(picks) / (time.perf_counter() - started)
    started = time.perf_counter()
    raw = sum(len(f.read_bytes()) for f in shard_files)
    sequential_rate = total_rows / (time.perf_counter() - started)
    return {"random_rows_per_second": round(random_rate, 1), "sequential_rows_per_second": round(sequential_rate, 1),
            "bytes_read": raw, "ratio": round(random_rate / sequential_rate, 3)}


def _measure(workspace: Path, steps: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as output, ExitStack() as cleanup:
        # The process group ends with the bench, so the process never exits while gloo's threads run.
        cleanup.callback(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
        bench = _prepare(workspace, Path(output), steps, batch_size)
        if bench.data.rejects is not None:
            cleanup.callback(bench.data.rejects.close)
        plain = _time_steps(bench)
    align_step = plain["align"]
    cached, in_loop, padded = plain["cached"], plain["in_loop"], plain["padded"]
    lengths = [len(s.input_ids) for b in bench.batches for s in b]
    dynamic_efficiency = sum(lengths) / sum(len(b) * max(len(s.input_ids) for s in b) for b in bench.batches)
    full_efficiency = sum(lengths) / (len(lengths) * bench.stage.max_length)
    tokens = sum(lengths) / len(bench.batches)
    step_flops = 4 * plain["llm_parameters"] * tokens  # forward + input-gradient backward
    real_llm = 4 * REAL_LLM_PARAMETERS * REAL_TOKENS_PER_SAMPLE
    # MiniGPT-4's stage 2 at these models' measured speed: its tokens at the cached step's tokens/s, plus, in the
    # loop, each sample's share of the encoder's time.
    budget_cached = STAGE2_SAMPLES * REAL_TOKENS_PER_SAMPLE / (tokens / cached)
    budget_in_loop = budget_cached + STAGE2_SAMPLES * (in_loop - cached) / batch_size
    return {
        "device": device_name(bench.device), "precision": bench.run.recipe.runtime.precision, "batch_size": batch_size,
        "steps_timed": steps, "llm_parameters": plain["llm_parameters"], "tokens_per_step": round(tokens, 1),
        "cached_features": {"step_seconds": round(cached, 5), "encoder_in_loop_step_seconds": round(in_loop, 5),
                            "speedup_measured": round(in_loop / cached, 2),
                            "speedup_projected_7b_eva_vit_g": round((real_llm + EVA_VIT_G_FLOPS) / real_llm, 3)},
        "minigpt4_stage2_budget": {"samples": STAGE2_SAMPLES, "tokens_per_sample": REAL_TOKENS_PER_SAMPLE,
                                   "cached_seconds": round(budget_cached, 1),
                                   "encoder_in_loop_seconds": round(budget_in_loop, 1)},
        "align_vs_plain_loop": {"align_step_seconds": round(align_step, 5), "plain_step_seconds": round(cached, 5),
                                "overhead_ratio": round(align_step / cached, 3)},
        "padding": {"dynamic_efficiency": round(dynamic_efficiency, 3), "max_length_efficiency": round(full_efficiency, 3),
                    "dynamic_step_seconds": round(cached, 5), "max_length_step_seconds": round(padded, 5),
                    "speedup": round(padded / cached, 2)},
        "store_reads": _store_reads(bench),
        "mfu": {"matmul_peak_flops": round(plain["peak"]), "step_flops": round(step_flops),
                "utilisation": round(step_flops / cached / plain["peak"], 4)},
    }
