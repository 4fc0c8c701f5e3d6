"""`align bench train`: training speed as ratios of two ways of doing the same work, run back to back in one process
on the same models and data (an `align demo` workspace: its encoder, LLM, store and caption manifest).

- cached features vs the frozen encoder in the loop (decode, preprocess, ViT + Q-Former every step, as MiniGPT-4,
  MiniGPT4Qwen and LLaVA train), measured, and projected to real shapes by FLOPs;
- align's training step (`align train`'s own per-step times) vs a minimal hand-written loop over the same batches;
- length-grouped dynamic padding vs padding every sample to max_length (padding efficiency and step time);
- feature-store random reads vs a raw sequential read of the same bytes;
- model FLOPs utilisation against a dense matmul peak measured in the same run.
"""

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from align.adapters.batch import pad_batch
from align.adapters.projector import build_projector
from align.adapters.vision_llm import VisionLLM
from align.backbones.llm import load_frozen_llm
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.backbones.vision import load_encoder
from align.backbones.vision.preprocessing import eval_view
from align.constants import METRICS, STORE_SHARDS
from align.errors import AlignError
from align.templates import IGNORE_INDEX
from align.tools.bench.bench import RESULTS_DIR, device_name, write_result
from align.tools.feature_store import DTYPE, ShardRows
from align.tools.images import read_image
from align.tools.training.data_order import DataOrder
from align.tools.training.render_cache import RenderCache, build_cache, settings_for
from align.tools.training.recipe import load_recipe

EVA_VIT_G_FLOPS = 0.53e12  # one 224² image through EVA ViT-g + Q-Former, forward
REAL_LLM_PARAMETERS = 6.7e9  # a 7B LLM
REAL_TOKENS_PER_SAMPLE = 200  # MiniGPT-4's stage-2 samples: 32 image slots and a reply


def _median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 1024) -> float:
    """Dense matmul FLOP/s on this device and dtype, measured now."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    seconds = _median_seconds(lambda: torch.matmul(a, b), 5)
    return 2 * size**3 / seconds


def bench_train(workspace: Path, *, steps: int = 20, batch_size: int = 16, out_dir: Path = RESULTS_DIR) -> tuple[dict, Path]:
    """Every comparison on an `align demo` workspace; the JSON result and where it was written."""
    workspace = Path(workspace)
    if not (workspace / "recipe.yaml").is_file() or not (workspace / "features").is_dir():
        raise AlignError(f"{workspace} is not an `align demo` workspace (run `align demo --out {workspace}` first)")
    device = torch.device("cpu")
    recipe = load_recipe(workspace / "recipe.yaml", [f"runtime.output_dir={tempfile.mkdtemp()}"])
    stage = recipe.stages[0]
    spec = get_backbone(recipe.backbone.name)
    store_meta = json.loads((workspace / "features" / "meta.json").read_text())
    queries = store_meta["row_shape"][1]
    cache = RenderCache(build_cache(settings_for(recipe, spec, stage, queries), workspace / "render-cache", 1, False))
    rows = ShardRows(workspace / "features", cache.meta["store_shards"], store_meta["row_shape"])
    tokenizer = backbone_tokenizer(spec, recipe.backbone.model)
    llm = load_frozen_llm(spec, recipe.backbone.model, dtype="fp32", device=device)
    torch.manual_seed(0)
    model = VisionLLM(llm, build_projector("linear", store_meta["row_shape"][-1], spec.hidden_size))
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    order = DataOrder(cache.samples_per_source, [1.0], batch_size, 0)
    batches = [sorted(cache.samples(order.sample_ids(0, s % order.steps_per_epoch), 0), key=lambda x: len(x.input_ids))
               for s in range(steps)]
    encoder = load_encoder(workspace / "encoder")
    manifest = [json.loads(line) for line in Path(stage.data[0].manifest).read_text().splitlines()]
    images = [str((Path(stage.data[0].manifest).parent / r["image"]).resolve()) for r in manifest]

    def step(samples, features: torch.Tensor, pad_to: int | None = None) -> None:
        if pad_to is not None:  # MiniGPT4Qwen pads every sample to max_length
            samples = [s.__class__(s.input_ids + [tokenizer.pad_id] * (pad_to - len(s.input_ids)),
                                   s.labels + [IGNORE_INDEX] * (pad_to - len(s.labels)), s.images, s.rows)
                       for s in samples]
        batch = pad_batch(samples, tokenizer.pad_id)
        logits = model(batch.input_ids, batch.attention_mask, batch.image_mask, features).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def cached_features(samples) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(rows.get(r)[0], np.float32) for s in samples for r in s.rows]))

    def encoded_features(samples) -> torch.Tensor:
        picked = [images[i % len(images)] for i in range(len(samples))]
        pixels = np.stack([eval_view(read_image(p), encoder.preprocessing) for p in picked])
        with torch.no_grad():
            return encoder.module(torch.from_numpy(pixels)).float()

    cursor = {"i": 0}

    def next_batch():
        cursor["i"] = (cursor["i"] + 1) % len(batches)
        return batches[cursor["i"]]

    cached = _median_seconds(lambda: (lambda b: step(b, cached_features(b)))(next_batch()), steps)
    in_loop = _median_seconds(lambda: (lambda b: step(b, encoded_features(b)))(next_batch()), steps)
    padded = _median_seconds(lambda: (lambda b: step(b, cached_features(b), stage.max_length))(next_batch()), steps)
    lengths = [len(s.input_ids) for b in batches for s in b]
    dynamic_efficiency = sum(lengths) / sum(len(b) * max(len(s.input_ids) for s in b) for b in batches)
    full_efficiency = sum(lengths) / (len(lengths) * stage.max_length)

    # align's own step: `align train` on the same stage and batch size, its metrics' median step time.
    from align.tools.training.trainer import train

    output = Path(tempfile.mkdtemp())
    train(workspace / "recipe.yaml", output=output, show_progress=False, overrides=[
        f"stages.{stage.name}.global_batch_size={batch_size}", f"stages.{stage.name}.micro_batch_size={batch_size}",
        f"stages.{stage.name}.steps_per_epoch={steps + 1}", f"stages.{stage.name}.epochs=1",
        f"stages.{recipe.stages[-1].name}.steps_per_epoch=1", f"stages.{recipe.stages[-1].name}.epochs=1",
        f"runtime.render_cache={workspace / 'render-cache'}"])
    metrics = [json.loads(line) for line in (output / METRICS).read_text().splitlines()]
    align_step = statistics.median(batch_size / m["samples_per_second"] for m in metrics
                                   if m["stage"] == stage.name and m["step"] > 1)

    # Store reads: random rows through the memory maps vs the same bytes read sequentially.
    shard_files = sorted((workspace / "features" / STORE_SHARDS).glob("*.f16"))
    total_rows = sum(f.stat().st_size for f in shard_files) // (DTYPE().itemsize * int(np.prod(store_meta["row_shape"])))
    numbers = [int(r) for r in cache.arrays["rows"]]
    rng = np.random.default_rng(0)
    picks = rng.choice(numbers, size=min(4096, 8 * len(numbers)))
    started = time.perf_counter()
    for number in picks:
        np.asarray(rows.get(int(number)), np.float32)
    random_rate = len(picks) / (time.perf_counter() - started)
    started = time.perf_counter()
    raw = sum(len(f.read_bytes()) for f in shard_files)
    sequential_rate = total_rows / (time.perf_counter() - started)

    llm_parameters = sum(p.numel() for p in llm.parameters())
    tokens = statistics.mean(sum(len(s.input_ids) for s in b) for b in batches)
    peak = matmul_peak(torch.float32, device)
    real_llm = 4 * REAL_LLM_PARAMETERS * REAL_TOKENS_PER_SAMPLE  # forward + input-gradient backward
    result = {
        "bench": "train", "device": device_name(device), "workspace": str(workspace),
        "command": f"align bench train --workspace {workspace} --steps {steps} --batch-size {batch_size}",
        "batch_size": batch_size, "steps_timed": steps, "llm_parameters": llm_parameters,
        "cached_features": {"step_seconds": round(cached, 5), "encoder_in_loop_step_seconds": round(in_loop, 5),
                            "speedup_measured": round(in_loop / cached, 2),
                            "speedup_projected_7b_eva_vit_g": round((real_llm + EVA_VIT_G_FLOPS) / real_llm, 3)},
        "align_vs_plain_loop": {"align_step_seconds": round(align_step, 5), "plain_step_seconds": round(cached, 5),
                                "overhead_ratio": round(align_step / cached, 3)},
        "padding": {"dynamic_efficiency": round(dynamic_efficiency, 3), "max_length_efficiency": round(full_efficiency, 3),
                    "dynamic_step_seconds": round(cached, 5), "max_length_step_seconds": round(padded, 5),
                    "speedup": round(padded / cached, 2)},
        "store_reads": {"random_rows_per_second": round(random_rate, 1),
                        "sequential_rows_per_second": round(sequential_rate, 1), "bytes_read": raw,
                        "ratio": round(random_rate / sequential_rate, 3)},
        "mfu": {"matmul_peak_flops": round(peak), "step_flops": round(4 * llm_parameters * tokens),
                "utilisation": round(4 * llm_parameters * tokens / cached / peak, 4)},
    }
    return write_result(result, out_dir, "train")
