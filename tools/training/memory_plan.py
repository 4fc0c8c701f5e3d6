"""`align plan`: the peak GPU memory of each stage of a recipe, predicted from the recipe and the LLM's shape alone,
whether it fits, and the largest micro-batch that does.

Per GPU, in bytes (every term is listed in the report):
  frozen weights    parameters × bytes per parameter (bf16/fp16 2, fp32 4; 8-bit: linear layers 1 byte plus one
                    fp32 scale per output row; 4-bit NF4: linear layers 0.5 byte plus one fp32 absmax per 64 weights;
                    embeddings, norms and the output layer stay 16-bit), divided by the world size under ZeRO-3, plus
                    two gathered layers (prefetch) under ZeRO-3
  activations       what autograd keeps for the input gradient through the frozen LLM, 16-bit, per layer and token:
                    12·hidden + 4·kv_width + 6·intermediate bytes (norm outputs, q/k/v, attention output, the three
                    MLP inputs and the gate product; memory-efficient attention keeps no seq² scores); with gradient
                    checkpointing only each layer's input (2·hidden) plus one layer recomputed
  logits            tokens × vocabulary × 10 bytes: 16-bit logits, their fp32 copy for the loss, its gradient
  projector         16 bytes per parameter (fp32 weights, gradients, Adam's two moments); ZeRO ≥ 1 divides the
                    optimizer's part by the world size
  CUDA context      0.6 GiB, and 10% of the activations and logits for allocator fragmentation
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from align.errors import AlignError
from align.tools.training.recipe import Recipe, Stage, load_recipe

GIB = 2**30
CUDA_CONTEXT = int(0.6 * GIB)
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class LLMShape:
    """What memory depends on in a decoder-only LLM."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv_width(self) -> int:
        """Width of the keys (and of the values) with grouped-query attention."""
        return self.hidden // self.heads * self.kv_heads

    @property
    def linear_per_layer(self) -> int:
        """Parameters of one layer's linear maps (q, k, v, o; gate, up, down)."""
        return self.hidden * (2 * self.hidden + 2 * self.kv_width) + 3 * self.hidden * self.intermediate

    @property
    def embedding_parameters(self) -> int:
        """Input embedding plus output layer (once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def parameters(self) -> int:
        """All parameters (norms included)."""
        return self.layers * (self.linear_per_layer + 2 * self.hidden) + self.embedding_parameters + self.hidden


# Public config.json shapes of the presets (used when no model directory is at hand).
PRESET_SHAPES = {
    "qwen-7b-chat": LLMShape(32, 4096, 11008, 32, 32, 151936),
    "qwen-14b-chat": LLMShape(40, 5120, 13696, 40, 40, 152064),
    "qwen2.5-7b-instruct": LLMShape(28, 3584, 18944, 28, 4, 152064),
    "llama-2-7b-chat": LLMShape(32, 4096, 11008, 32, 32, 32000),
    "llama-2-13b-chat": LLMShape(40, 5120, 13824, 40, 40, 32000),
    "vicuna-7b-v0": LLMShape(32, 4096, 11008, 32, 32, 32000),
    "vicuna-7b-v1.5": LLMShape(32, 4096, 11008, 32, 32, 32000),
    "vicuna-13b-v0": LLMShape(40, 5120, 13824, 40, 40, 32000),
    "baichuan2-7b-chat": LLMShape(32, 4096, 11008, 32, 32, 125696),
    "baichuan2-13b-chat": LLMShape(40, 5120, 13696, 40, 40, 125696),
    "baichuan-13b-chat": LLMShape(40, 5120, 13696, 40, 40, 64000),
}


def shape_from_config(config: dict) -> LLMShape:
    """The shape in a model's config.json (LLaMA-style names; Qwen-1's doubled intermediate size halved)."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config.get("num_attention_heads", config.get("n_head")))
        intermediate = int(config["intermediate_size"])
        if config.get("model_type") == "qwen":  # Qwen-1 states the width of both MLP halves together
            intermediate //= 2
        return LLMShape(
            layers=int(config.get("num_hidden_layers", config.get("n_layer"))), hidden=hidden,
            intermediate=intermediate, heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AlignError(f"the model's config.json lacks what planning needs ({exc})") from None


def weight_bytes(shape: LLMShape, dtype_bytes: int, quantization: str) -> int:
    """Bytes of the frozen LLM's weights on one GPU before any partitioning."""
    linear = shape.layers * shape.linear_per_layer
    rest = shape.parameters - linear
    if quantization == "8bit":
        rows = shape.layers * (2 * shape.hidden + 2 * shape.kv_width + 2 * shape.intermediate + shape.hidden)
        return linear + 4 * rows + 2 * rest
    if quantization == "4bit":
        return linear // 2 + 4 * math.ceil(linear / 64) + 2 * rest
    return dtype_bytes * shape.parameters


@dataclass
class StagePlan:
    """One stage's predicted peak, by term, for one GPU."""

    stage: str
    micro_batch: int
    tokens: int
    weights: int
    activations: int
    logits: int
    projector: int
    overhead: int
    fits: bool = True
    largest_micro_batch: int = 0
    split_problem: str | None = None  # why the global batch cannot be split into these micro-batches on the GPUs

    @property
    def total(self) -> int:
        """The predicted peak."""
        return self.weights + self.activations + self.logits + self.projector + self.overhead

    def as_dict(self) -> dict:
        """JSON view, in GiB."""
        return {**asdict(self),
                **{f"{k}_gib": round(getattr(self, k) / GIB, 2)
                   for k in ("weights", "activations", "logits", "projector", "overhead", "total")}}


QFORMER_WIDTH = 768  # BLIP-2's Q-Former output width: the projector's input when no store says otherwise


def projector_parameters(kind: str, in_features: int, hidden: int) -> int:
    """The parameters of a projector of `kind` from `in_features` to the LLM's `hidden` width (built on the meta
    device: no memory)."""
    import torch

    from align.adapters.projector import build_projector

    with torch.device("meta"):
        return sum(p.numel() for p in build_projector(kind, in_features, hidden).parameters())


def plan_stage(shape: LLMShape, stage: Stage, recipe: Recipe, in_features: int, gpus: int, micro: int,
               budget: int) -> StagePlan:
    """The predicted peak of `stage` with micro-batches of `micro` samples of max_length tokens."""
    runtime = recipe.runtime
    dtype_bytes = 4 if runtime.precision == "fp32" else 2
    zero3 = runtime.zero_stage == 3
    weights = weight_bytes(shape, dtype_bytes, runtime.quantization)
    if zero3:
        layer = (shape.linear_per_layer + 2 * shape.hidden) * dtype_bytes
        weights = math.ceil(weights / gpus) + 2 * layer
    tokens = micro * stage.max_length
    per_layer = 12 * shape.hidden + 4 * shape.kv_width + 6 * shape.intermediate
    scale = dtype_bytes / 2
    if runtime.gradient_checkpointing:
        activations = int(tokens * (shape.layers * 2 * shape.hidden + per_layer) * scale)
    else:
        activations = int(tokens * shape.layers * per_layer * scale)
    logits = tokens * shape.vocab * 10
    optimizer_share = gpus if runtime.zero_stage >= 1 else 1
    projector = projector_parameters(recipe.projector, in_features, shape.hidden) * (8 + math.ceil(8 / optimizer_share))
    overhead = CUDA_CONTEXT + int(FRAGMENTATION * (activations + logits))
    plan = StagePlan(stage.name, micro, tokens, weights, activations, logits, projector, overhead)
    plan.split_problem = stage.model_copy(update={"micro_batch_size": micro}).split_problem(gpus)
    plan.fits = plan.total <= budget and plan.split_problem is None
    return plan


def plan_recipe(path: Path | str, overrides: list[str] = (), *, gpu_memory_gb: float = 24.0, gpus: int = 1,
                in_features: int | None = None) -> list[StagePlan]:
    """Every stage's plan for GPUs of `gpu_memory_gb`, with the largest micro-batch that fits (0: none does). The
    projector's input width is `in_features`, else the recipe's feature store's, else BLIP-2's Q-Former width."""
    from align.backbones.model_dir import model_config
    from align.backbones.registry import get_backbone
    from align.tools.feature_store import FeatureStore

    recipe = load_recipe(path, list(overrides))
    if in_features is None:
        try:
            in_features = FeatureStore.read_meta(recipe.features)["row_shape"][-1]
        except AlignError:  # not extracted yet
            in_features = QFORMER_WIDTH
    spec = get_backbone(recipe.backbone.name)
    model = recipe.backbone.model or (Path(spec.model_path) if spec.model_path else None)
    if model is not None and (Path(model) / "config.json").is_file():
        shape = shape_from_config(model_config(Path(model)))
    elif (spec.preset or spec.name) in PRESET_SHAPES:
        shape = PRESET_SHAPES[spec.preset or spec.name]
    else:
        raise AlignError(f"backbone '{spec.name}': no model directory with a config.json to read its shape from")
    budget = int(gpu_memory_gb * GIB)
    plans = []
    for stage in recipe.stages:
        plan = plan_stage(shape, stage, recipe, in_features, gpus, stage.micro_batch_size, budget)
        # Micro-batches that split the global batch over the GPUs, largest first.
        sizes = [m for m in range(stage.global_batch_size // gpus, 0, -1) if stage.global_batch_size % (m * gpus) == 0]
        plan.largest_micro_batch = next(
            (m for m in sizes if plan_stage(shape, stage, recipe, in_features, gpus, m, budget).fits), 0)
        plans.append(plan)
    return plans
