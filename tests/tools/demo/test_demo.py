"""`align demo`: the whole pipeline on tiny built-in models beats its untrained projector, and reports it as promised."""

import json

import pytest

from align.tools.demo.demo import MARKER, REQUIRED_GAIN, DemoError, prepare_workspace
from align.tools.demo.demo_world import Content, names_correctly
from conftest import run_align


def test_demo_trains_a_projector_that_names_held_out_shapes(tmp_path):
    out = tmp_path / "ws"
    result = run_align("demo", "--out", out, "--json", home=tmp_path / "home", timeout=1800)  # a safety net, not a speed check
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # stdout is the one JSON object and nothing else
    assert set(report) == {"held_out", "accuracy", "seconds", "workspace"}
    assert set(report["accuracy"]) == {"untrained", "stage1", "stage2"} and report["held_out"] == 48
    accuracy = report["accuracy"]
    assert accuracy["stage2"] >= accuracy["untrained"] + REQUIRED_GAIN and accuracy["stage2"] >= 0.6
    assert report["workspace"] == str(out.resolve())
    # The pipeline a user runs: a recipe that says how to run it, a store, one adapter per stage.
    assert (out / "recipe.yaml").read_text().startswith(f"# align train {out.resolve() / 'recipe.yaml'}")
    assert json.loads((out / "features" / "meta.json").read_text())["count"] == 480
    for stage in ("caption", "chat"):
        assert (out / "runs" / stage / "adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / "home").exists()  # nothing registered outside the workspace
    # `align bench train` runs on a demo workspace and writes every comparison (figures are never asserted).
    bench = run_align("bench", "train", "--workspace", out, "--steps", "2", "--batch-size", "8",
                      "--out-dir", tmp_path / "results", home=tmp_path / "home", timeout=1800)
    assert bench.returncode == 0, bench.stderr[-3000:]
    [written] = (tmp_path / "results").glob("train-*.json")
    figures = json.loads(written.read_text())
    assert {"cached_features", "align_vs_plain_loop", "padding", "store_reads", "mfu", "versions"} <= set(figures)
    assert 0 < figures["padding"]["max_length_efficiency"] <= figures["padding"]["dynamic_efficiency"] <= 1
    chat = run_align("bench", "chat", "--workspace", out, "--turns", "3", "--out-dir", tmp_path / "results",
                     home=tmp_path / "home", timeout=1800)
    assert chat.returncode == 0, chat.stderr[-3000:]
    [written] = (tmp_path / "results").glob("chat-*.json")
    assert {"with_cache", "without_cache", "first_text_speedup"} <= set(json.loads(written.read_text()))


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
