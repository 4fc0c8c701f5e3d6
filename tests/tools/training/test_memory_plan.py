"""`align plan`: the planner's arithmetic on hand-computed small shapes, and the shipped 24 GB recipes fit."""

import json
from pathlib import Path

import pytest

from align.tools.training.memory_plan import CUDA_CONTEXT, LLMShape, plan_recipe, plan_stage, shape_from_config, weight_bytes
from align.tools.training.recipe import load_recipe
from conftest import run_align

ROOT = Path(__file__).resolve().parents[3]
SMALL = LLMShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)


def test_parameters_and_weight_bytes_by_hand():
    # q 8×8, k and v 8×4 each, o 8×8 = 192; gate/up/down 3 × 8×16 = 384 per layer
    assert SMALL.kv_width == 4 and SMALL.linear_per_layer == 576
    assert SMALL.parameters == 2 * (576 + 16) + 2 * 10 * 8 + 8 == 1352
    assert weight_bytes(SMALL, 2, "none") == 2704
    # 8-bit: 1152 linear bytes, one fp32 scale per output row (2·(8+4+4+8... = 128 rows), 200 16-bit others
    assert weight_bytes(SMALL, 2, "8bit") == 1152 + 4 * 128 + 2 * 200
    # 4-bit: half a byte per linear weight, one fp32 absmax per 64 of them
    assert weight_bytes(SMALL, 2, "4bit") == 576 + 4 * 18 + 2 * 200


def test_a_stage_by_hand():
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["runtime.precision=bf16", "stages.caption.max_length=5"])
    stage = recipe.stages[0]
    plan = plan_stage(SMALL, stage, recipe, in_features=4, gpus=1, micro=2, budget=10**12)
    per_layer = 12 * 8 + 4 * 4 + 6 * 16  # 208 bytes per token and layer
    assert (plan.tokens, plan.weights, plan.activations, plan.logits) == (10, 2704, 10 * 2 * per_layer, 10 * 10 * 10)
    assert plan.projector == (4 * 8 + 8) * 16
    assert plan.overhead == CUDA_CONTEXT + int(0.1 * (plan.activations + plan.logits))
    recipe.runtime.gradient_checkpointing = True
    assert plan_stage(SMALL, stage, recipe, 4, 1, 2, 10**12).activations == 10 * (2 * 2 * 8 + per_layer)
    recipe.runtime.zero_stage = 3
    zero3 = plan_stage(SMALL, stage, recipe, 4, 2, 2, 10**12)
    assert zero3.weights == 2704 // 2 + 2 * (576 + 16) * 2  # half the weights, two gathered layers
    assert zero3.projector == 40 * (8 + 4)  # Adam's moments partitioned over two GPUs


def test_the_projector_term_counts_the_recipes_projector_kind():
    # mlp2x_gelu (768 → 4096 → 4096) was counted as a linear 768 → 4096: about 270 MB short with Adam.
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["projector=mlp2x_gelu"])
    plan = plan_stage(SMALL, recipe.stages[0], recipe, in_features=4, gpus=1, micro=2, budget=10**12)
    assert plan.projector == ((4 * 8 + 8) + (8 * 8 + 8)) * 16
    wide = LLMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
    linear = plan_stage(wide, recipe.stages[0], recipe.model_copy(update={"projector": "linear"}), 768, 1, 1, 10**12)
    mlp = plan_stage(wide, recipe.stages[0], recipe, 768, 1, 1, 10**12)
    assert mlp.projector - linear.projector == (4096 * 4096 + 4096) * 16  # the second layer, with Adam: 269 MB


@pytest.mark.slow
def test_a_micro_batch_the_global_batch_cannot_split_into_over_the_gpus_does_not_fit(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["stages.caption.global_batch_size=12",
                                                            "stages.caption.micro_batch_size=4"])
    plan = plan_stage(SMALL, recipe.stages[0], recipe, 4, 2, 4, 10**12)
    assert not plan.fits and "does not split into micro-batches of 4 over 2" in plan.split_problem
    assert plan_stage(SMALL, recipe.stages[0], recipe, 4, 2, 2, 10**12).fits
    out = run_align("plan", ROOT / "recipes" / "qwen-7b-chat-zh-3090.yaml", "--gpus", "3")
    assert out.returncode == 2 and "does not split into micro-batches" in out.stderr, out.stderr
    assert "NO (batch split)" in out.stdout


def test_shapes_from_config_json():
    qwen1 = shape_from_config({"model_type": "qwen", "hidden_size": 4096, "num_attention_heads": 32,
                               "intermediate_size": 22016, "num_hidden_layers": 32, "vocab_size": 151936})
    assert qwen1.intermediate == 11008 and qwen1.kv_heads == 32  # Qwen-1 states both MLP halves together
    qwen2 = shape_from_config({"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
                               "intermediate_size": 18944, "num_hidden_layers": 28, "vocab_size": 152064})
    assert qwen2.kv_width == 512 and round(qwen2.parameters / 1e9, 2) == 7.62  # Qwen2.5-7B's published count


@pytest.mark.parametrize("name", ["qwen-7b-chat-zh-3090.yaml", "qwen2.5-7b-instruct-zh-3090.yaml"])
def test_the_shipped_3090_recipes_fit_24_gb(name):
    plans = plan_recipe(ROOT / "recipes" / name, gpu_memory_gb=24)
    assert all(p.fits and p.total < 24 * 2**30 for p in plans)


@pytest.mark.slow
def test_plan_command_says_what_does_not_fit():
    ok = run_align("plan", ROOT / "recipes" / "qwen-7b-chat-zh-3090.yaml")
    assert ok.returncode == 0 and "yes" in ok.stdout
    tight = run_align("plan", ROOT / "recipes" / "qwen-7b-chat-zh-3090.yaml", "--gpu-memory", "12")
    assert tight.returncode == 2 and tight.stderr.startswith("error: does not fit 12 GB per GPU")
    as_json = run_align("plan", ROOT / "recipes" / "qwen-7b-chat-zh-3090.yaml", "--gpu-memory", "12", "--json")
    assert as_json.returncode == 2 and not all(p["fits"] for p in json.loads(as_json.stdout))  # exited 0 before


def test_the_activation_model_matches_what_autograd_keeps_on_cpu():
    """What a frozen LLaMA-style model saves for the input gradient (weights excluded: they are already counted),
    measured with saved-tensor hooks, against the planner's activation term plus the 16-bit logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    for hidden, intermediate, layers, heads, kv_heads in ((64, 176, 2, 4, 2), (128, 352, 3, 8, 8)):
        config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def keep(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        embeds = torch.randn(4, 64, hidden, dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(inputs_embeds=embeds)
        shape = LLMShape(layers, hidden, intermediate, heads, kv_heads, 256)
        predicted = 4 * 64 * (layers * (12 * hidden + 4 * shape.kv_width + 6 * intermediate) + 2 * 256)
        assert 0.85 < sum(saved.values()) / predicted < 1.15
