"""Projector training under DeepSpeed on CPU: only the projector learns, stages chain, runs resume exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.adapters.adapter_files import AdapterError, load_adapter
from align.errors import AlignError
from align.tools.training.recipe import RecipeError, load_recipe
from align.tools.runtime import child_environment, free_port
from align.tools.training.train_state import committed_steps
from align.tools.training.trainer import train
from conftest import run_align, tiny_recipe

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def workspace(train_workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    recipe, sets = tiny_recipe(train_workspace, tmp_path)
    sets.append(f"runtime.output_dir={tmp_path / 'run'}")
    return {**train_workspace, "recipe": recipe, "sets": sets, "run": tmp_path / "run"}


def train_until_ctrl_c(workspace, monkeypatch, micro_batch: int, **kwargs) -> None:
    """Train, pressing Ctrl-C while micro-batch number `micro_batch` (counted from 1) is being collated."""
    from align.tools.training import trainer

    real_collate, calls = trainer.collate, {"n": 0}

    def ctrl_c(*args, **inner):
        calls["n"] += 1
        if calls["n"] == micro_batch:
            os.kill(os.getpid(), signal.SIGINT)
        return real_collate(*args, **inner)

    monkeypatch.setattr(trainer, "collate", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(workspace["recipe"], show_progress=False, **kwargs)
    monkeypatch.setattr(trainer, "collate", real_collate)


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_loss_falls_and_only_the_projector_learns(workspace):
    outcome = train(workspace["recipe"], overrides=workspace["sets"] + ["stages.caption.epochs=8"], show_progress=False)
    losses = [m["loss"] for m in metrics(workspace["run"]) if m["stage"] == "caption"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    llm = outcome.model.llm
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(workspace["llama"]).state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in llm.state_dict().items())  # bitwise unchanged
    assert all(p.grad is None for p in llm.parameters())  # gradients reached only the projector
    first = metrics(workspace["run"])[0]
    assert {"loss", "lr", "grad_norm", "samples_per_second", "tokens_per_second", "padding_efficiency",
            "peak_memory_mb"} <= set(first)
    assert 0 < first["padding_efficiency"] <= 1
    assert first["lr"] == pytest.approx(1e-3)  # the rate step 1 applied: the warm-up's start, not the next step's
    assert not any(m["skipped"] for m in metrics(workspace["run"]))
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in metrics(workspace["run"]))  # ZeRO 0 too


@pytest.mark.slow
def test_stages_chain_and_adapters_bind_their_backbone(workspace):
    outcome = train(workspace["recipe"], overrides=workspace["sets"] + ["runtime.save_interval=1"], show_progress=False)
    caption, chat = outcome.adapters
    config, weights = load_adapter(chat)
    assert (config.stage, config.template, config.backbone, config.projector) == ("chat", "vicuna-v1.1", "tiny-llama", "linear")
    assert config.num_query_tokens == 4 and config.in_features == 24 and config.out_features == 32
    assert set(weights) == {"weight", "bias"}
    assert load_adapter(caption)[0].template == "caption"
    checkpoints = workspace["run"] / "caption" / "checkpoints"
    saved = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file())
    assert 0 < saved < 100_000  # projector and optimizer only: the frozen LLM is never checkpointed
    with pytest.raises(AdapterError, match="made for backbone 'tiny-llama', not 'tiny-qwen2'"):
        config.check_fits(backbone="tiny-qwen2", hidden_size=32, vocab_size=512, template="chatml")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_interrupted_and_resumed_equals_uninterrupted(workspace, monkeypatch, zero_stage):
    """Under every ZeRO stage: the pickle-free state restores DeepSpeed's optimizer exactly."""
    sets = workspace["sets"] + ["stages.caption.epochs=2", "stages.chat.epochs=1", f"runtime.zero_stage={zero_stage}"]
    full = train(workspace["recipe"], output=workspace["run"] / "full", overrides=sets, show_progress=False)

    # Ctrl-C in the middle of the caption stage's third step (two micro-batches a step).
    train_until_ctrl_c(workspace, monkeypatch, 5, output=workspace["run"] / "cut", overrides=sets)
    assert committed_steps(workspace["run"] / "cut" / "caption" / "checkpoints") == [3]
    resumed = train(workspace["recipe"], output=workspace["run"] / "cut", resume=True, overrides=sets, show_progress=False)
    for a, b in zip(full.adapters, resumed.adapters):
        wa, wb = adapter_weights(a), adapter_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_continues_with_the_runs_own_recipe_and_says_where(workspace, monkeypatch):
    sets = workspace["sets"] + ["stages.caption.epochs=2", "stages.chat.epochs=1"]
    full = train(workspace["recipe"], output=workspace["run"] / "full", overrides=sets, show_progress=False)
    cut = workspace["run"] / "cut"
    train_until_ctrl_c(workspace, monkeypatch, 5, output=cut, overrides=sets)
    resumed = run_align("train", "--resume", "--output", cut)  # no recipe: the one the run started with
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming stage caption at step 3 of 4" in resumed.stdout
    for stage in ("caption", "chat"):
        a, b = adapter_weights(full.adapters[0].parent.parent / stage / "adapter"), adapter_weights(cut / stage / "adapter")
        assert all(torch.equal(a[k], b[k]) for k in a)
    again = run_align("train", "--resume", "--output", cut)
    assert again.returncode == 0 and "stage caption is finished" in again.stdout
    for args, message in ((["train", "--resume"], "give the recipe to train"),
                          (["train", "--resume", "--output", workspace["run"] / "none"], "holds no run to resume")):
        refused = run_align(*args)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


@pytest.mark.slow
def test_a_diverging_stage_stops_and_keeps_its_last_finite_checkpoint(workspace, monkeypatch):
    # From its third step the loss is NaN (as a diverging rate makes it); before, training went on, logged NaN and
    # wrote an all-NaN adapter with exit code 0.
    from align.tools.training import trainer

    real, calls = trainer.micro_batch_loss, {"n": 0}

    def diverging(*args):
        calls["n"] += 1
        loss, tokens = real(*args)
        return (loss * float("nan") if calls["n"] > 4 else loss), tokens  # two micro-batches a step

    monkeypatch.setattr(trainer, "micro_batch_loss", diverging)
    sets = workspace["sets"] + ["runtime.save_interval=1"]
    with pytest.raises(AlignError, match="stage caption diverged at step 3: the loss is nan") as error:
        train(workspace["recipe"], overrides=sets, show_progress=False)
    caption = workspace["run"] / "caption"
    assert not (caption / "adapter").exists() and not (caption / "stage_done.json").exists()
    for step in committed_steps(caption / "checkpoints"):
        state = load_file(caption / "checkpoints" / f"step{step:08d}" / "rank00000.safetensors")
        assert all(torch.isfinite(t).all() for t in state.values())
    assert committed_steps(caption / "checkpoints") == [1, 2] and "checkpoint of step 2 is kept" in str(error.value)


@pytest.mark.slow
def test_resume_refuses_data_that_changed_since_the_checkpoint(workspace, monkeypatch, tmp_path):
    # Captions rewritten after a checkpoint: --resume went on (loss 0.8 → 9.3, exit 0) since only the recipe was
    # compared. The checkpoint records its data (the render cache's key) and a change is refused.
    manifest = tmp_path / "captions.jsonl"
    shutil.copy(workspace["manifest"], manifest)
    sets = [s for s in workspace["sets"] if "manifest=" not in s] + [
        f"stages.caption.data.0.manifest={manifest}", f"stages.chat.data.0.manifest={manifest}",
        f"stages.caption.data.0.image_root={workspace['manifest'].parent}",
        f"stages.chat.data.0.image_root={workspace['manifest'].parent}", "stages.caption.epochs=2",
        "stages.chat.epochs=1"]
    cut = workspace["run"] / "cut"
    train_until_ctrl_c(workspace, monkeypatch, 5, output=cut, overrides=sets)
    manifest.write_text(manifest.read_text().replace("picture", "painting"))
    with pytest.raises(AlignError, match="stage caption: its data changed since the checkpoint of step 3"):
        train(workspace["recipe"], output=cut, resume=True, overrides=sets, show_progress=False)


@pytest.mark.slow
def test_adapter_does_not_depend_on_the_micro_batch_size(workspace):
    """Per-token loss over the global batch: micro-batches of 1, 4 and 16 give the same adapter."""
    adapters = []
    for micro in (1, 4, 16):
        sets = workspace["sets"] + ["stages.caption.global_batch_size=16", f"stages.caption.micro_batch_size={micro}",
                                    "stages.caption.epochs=4", "stages.chat.epochs=1"]
        outcome = train(workspace["recipe"], output=workspace["run"] / f"micro{micro}", overrides=sets,
                        show_progress=False)
        adapters.append(adapter_weights(outcome.adapters[0]))
    largest = max((a[k] - b[k]).abs().max().item() for a in adapters for b in adapters for k in a)
    assert largest < 1e-5, largest
    # MiniGPT-4's mean of micro-batch means is kept for reproductions, and does depend on the split.
    means = []
    for micro in (1, 16):
        sets = workspace["sets"] + ["stages.caption.global_batch_size=16", f"stages.caption.micro_batch_size={micro}",
                                    "stages.caption.epochs=4", "stages.chat.epochs=1", "stages.caption.loss=micro_batch_mean"]
        outcome = train(workspace["recipe"], output=workspace["run"] / f"mean{micro}", overrides=sets, show_progress=False)
        means.append(adapter_weights(outcome.adapters[0]))
    assert max((means[0][k] - means[1][k]).abs().max().item() for k in means[0]) > 1e-4


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_and_planted_pickles_are_never_read(workspace, monkeypatch):
    sets = workspace["sets"] + ["stages.caption.epochs=2", "stages.chat.epochs=1", "runtime.save_interval=1"]
    train_until_ctrl_c(workspace, monkeypatch, 3, overrides=sets)
    with pytest.raises(AlignError, match=r"changed recipe \(stages.caption.lr.init_lr\)"):
        train(workspace["recipe"], resume=True, overrides=sets + ["stages.caption.lr.init_lr=0.5"], show_progress=False)
    # DeepSpeed's pickled checkpoint files, planted where a resume looks, are never opened.
    checkpoints = workspace["run"] / "caption" / "checkpoints"
    planted = checkpoints / "global_step1"
    planted.mkdir()
    (planted / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04not a tensor")
    (checkpoints / "latest").write_text("global_step1")
    resumed = train(workspace["recipe"], resume=True, overrides=sets, show_progress=False)
    assert all(path.is_dir() for path in resumed.adapters)
    # Only the newest checkpoints are kept (runtime.keep_checkpoints, 2 by default).
    assert len(committed_steps(checkpoints)) <= 2


def test_set_paths_resolve_against_the_working_directory(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(workspace["recipe"], ["features=store", "stages.caption.data.0.manifest=m.jsonl",
                                               "runtime.output_dir=out"])
    assert recipe.features == tmp_path / "store" and recipe.runtime.output_dir == tmp_path / "out"
    assert recipe.stages[0].data[0].manifest == tmp_path / "m.jsonl"
    assert recipe.stages[1].data[0].manifest == workspace["recipe"].parent / "data" / "captions.jsonl"  # the file's


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_trains_and_chains(workspace, zero_stage):
    sets = workspace["sets"] + [f"runtime.zero_stage={zero_stage}", "stages.caption.epochs=1", "stages.chat.epochs=1"]
    outcome = train(workspace["recipe"], overrides=sets, show_progress=False)
    for adapter in outcome.adapters:
        config, weights = load_adapter(adapter)
        assert weights["weight"].shape == (32, 24) and config.step > 0
    # ZeRO-3 replaced torch's linear while loading; the process is left with torch's own.
    assert torch.nn.functional.linear is torch._C._nn.linear


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_llm_paths_run(workspace, quantization):
    import bitsandbytes as bnb

    sets = workspace["sets"] + [f"runtime.quantization={quantization}", "runtime.precision=bf16",
                                "stages.caption.epochs=1", "stages.chat.epochs=1"]
    outcome = train(workspace["recipe"], overrides=sets, show_progress=False)
    kinds = {type(m) for m in outcome.model.llm.modules()}
    assert (bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit) in kinds
    assert torch.isfinite(adapter_weights(outcome.adapters[-1])["weight"]).all()


@pytest.mark.slow
def test_qwen2_architecture_with_its_own_chat_template(workspace):
    sets = workspace["sets"] + ["backbone.name=tiny-qwen2", "stages.caption.epochs=1", "stages.chat.epochs=1"]
    outcome = train(workspace["recipe"], overrides=sets, show_progress=False)
    assert load_adapter(outcome.adapters[-1])[0].template == "hf-chat"  # tiny-qwen2 was added with its chat_template


@pytest.mark.slow
def test_two_processes_end_with_the_same_adapter_as_one(workspace):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    sets = workspace["sets"] + ["stages.caption.epochs=2", "stages.chat.epochs=1"]
    # In-process trainings of this session left their rendezvous variables in os.environ; children start clean.
    extensions = workspace["run"] / "torch_extensions"  # where DeepSpeed would JIT-compile C++ ops
    env = child_environment() | {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}

    def run(prefix, output):
        args = [*prefix, "-m", "align", "train", str(workspace["recipe"]), "--output", str(output)]
        for s in sets:
            args += ["--set", s]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "built successfully" not in result.stdout + result.stderr  # CPU training compiles nothing

    run([sys.executable], workspace["run"] / "one")
    # A free port, so that two suites on one host do not collide.
    run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port())], workspace["run"] / "two")
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
    for stage in ("caption", "chat"):
        one, two = (adapter_weights(workspace["run"] / n / stage / "adapter") for n in ("one", "two"))
        for key in one:
            torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_recipe_errors_are_clear(tmp_path):
    recipe = tmp_path / "r.yaml"
    shutil.copy(ROOT / "recipes" / "tiny.yaml", recipe)
    with pytest.raises(RecipeError, match=r"runtime.zero_stag: unknown key \(did you mean 'zero_stage'\?\)"):
        load_recipe(recipe, ["runtime.zero_stag=2"])
    with pytest.raises(RecipeError, match="global_batch_size 8 is not a multiple of micro_batch_size 3"):
        load_recipe(recipe, ["stages.caption.micro_batch_size=3"])
    with pytest.raises(RecipeError, match="2 problem"):
        load_recipe(recipe, ["runtime.precision=fp8", "stages.chat.lr.init_lr=-1"])
    with pytest.raises(RecipeError, match="no item 'stage9'"):
        load_recipe(recipe, ["stages.stage9.epochs=1"])
    with pytest.raises(RecipeError, match="at_start asks the benchmark: give eval a benchmark"):
        load_recipe(recipe, ["stages.chat.eval={data: [{manifest: data/captions.jsonl}], at_start: true}"])
    with pytest.raises(RecipeError, match="projector_init: Input should be 'matched' or 'default'"):
        load_recipe(recipe, ["projector_init=xavier"])
    for escape in ("..", "."):  # a stage is a folder under the output directory: never outside it
        with pytest.raises(RecipeError, match="stages.0.name"):
            load_recipe(recipe, [f"stages.caption.name={escape}"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# align train recipes/") and path.name in first_line
    assert recipe.runtime.trust_remote_code is False  # Qwen-1 and Baichuan load natively: no recipe runs model code


@pytest.mark.slow
def test_validate_command(workspace):
    args = ["validate", workspace["recipe"]]
    for s in workspace["sets"]:
        args += ["--set", s]
    ok = run_align(*args)
    assert ok.returncode == 0 and "ok: 2 stages" in ok.stdout, ok.stderr
    bad = run_align(*args, "--set", "backbone.name=nope")
    assert bad.returncode == 2 and "unknown backbone 'nope'" in bad.stderr
    # What would fail at run time is reported at once, each problem named.
    bad = run_align(*args, "--set", "stages.caption.prompts=[Describe.]", "--set", "stages.chat.lr.warmup_steps=50",
                    "--set", "runtime.zero_stage=3", "--set", "runtime.quantization=8bit", "--world-size", "3")
    assert bad.returncode == 2 and "5 problems" in bad.stderr, bad.stderr
    for expected in ("takes no prompt text", "warmup_steps 50 is not shorter than the run (at most 4",
                     "8/4-bit weights cannot be partitioned", "does not split into micro-batches of 4 over 3"):
        assert expected in bad.stderr
    rendered = run_align(*args, "--render", "--set", f"runtime.output_dir={workspace['run']}")
    assert rendered.returncode == 0, rendered.stderr
    assert "caption: 16 records, 16 samples (0 truncated), 6 steps; rejected: none" in rendered.stdout
    assert (workspace["run"] / "render-cache").is_dir()


@pytest.mark.slow
def test_no_weight_decay_on_biases_and_norms_and_no_dropout_in_the_frozen_llm(workspace):
    from align.adapters.projector import build_projector
    from align.backbones.llm import without_dropout
    from align.tools.training.trainer import parameter_groups
    from transformers import LlamaConfig, LlamaForCausalLM

    projector = build_projector("mlp2x_gelu", 8, 16)
    groups = parameter_groups(projector, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(p.ndim == 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, attention_dropout=0.3))
    without_dropout(llm).train()
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(llm(ids).logits, llm(ids).logits)  # train mode is deterministic: no dropout left
    assert llm.config.attention_dropout == 0.0


@pytest.mark.slow
def test_an_output_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(workspace):
    from align.files import FolderLock

    sets = workspace["sets"] + ["stages.caption.epochs=1", "stages.chat.epochs=1"]
    train(workspace["recipe"], overrides=sets, show_progress=False)
    with pytest.raises(AlignError, match=r"holds a run \(recipe.json\); pass --resume to continue it or --overwrite"):
        train(workspace["recipe"], overrides=sets, show_progress=False)
    again = train(workspace["recipe"], overrides=sets, show_progress=False, overwrite=True)
    assert all(a.is_dir() for a in again.adapters)
    with FolderLock(workspace["run"], "folder"):
        with pytest.raises(AlignError, match="is in use by another align job"):
            train(workspace["recipe"], overrides=sets, show_progress=False, resume=True)
    (workspace["run"].parent / "file").write_text("")
    with pytest.raises(AlignError, match="is a file, not a folder"):
        train(workspace["recipe"], output=workspace["run"].parent / "file", overrides=sets, show_progress=False)


def store_with_a_nan_row(workspace, tmp_path) -> list[str]:
    """A copy of the workspace's store whose row of 3.png holds NaN; the --set overrides that train on it."""
    import numpy as np

    from align.tools.feature_store import FeatureStore

    features = tmp_path / "features"
    shutil.copytree(workspace["features"], features)
    store = FeatureStore.open(features)
    location = store.index[store.find(Path(workspace["manifest"]).parent / "3.png")]
    shard = features / "shards" / f"{location.shard}.f16"
    rows = np.fromfile(shard, dtype=np.float16).reshape(-1, *store.row_shape)
    rows[location.row, :, 0, 0] = np.nan  # every view, after the checksums were written: only training can notice
    rows.tofile(shard)
    return [s for s in workspace["sets"] if not s.startswith("features=")] + [f"features={features}"]


@pytest.mark.slow
def test_non_finite_features_are_muted_and_rejected_not_trained_on(workspace, tmp_path):
    sets = store_with_a_nan_row(workspace, tmp_path)
    outcome = train(workspace["recipe"], overrides=sets + ["stages.caption.epochs=2", "stages.chat.epochs=1"],
                    show_progress=False)
    assert all(torch.isfinite(t).all() for a in outcome.adapters for t in adapter_weights(a).values())
    done = json.loads((workspace["run"] / "caption" / "stage_done.json").read_text())
    assert done["muted_samples"] == 2  # the record of 3.png, once per epoch
    rejects = (workspace["run"] / "caption" / "rejects.jsonl").read_text()
    assert "non-finite features in the feature store" in rejects and "captions.jsonl:4" in rejects
    assert all(m["loss"] == m["loss"] for m in metrics(workspace["run"]))  # never NaN


@pytest.mark.slow
def test_samples_found_broken_before_an_interruption_stay_in_the_rejects(workspace, tmp_path, monkeypatch):
    # A resumed stage copied the render cache's rejects over its log, losing the muted samples logged before.
    sets = store_with_a_nan_row(workspace, tmp_path) + ["stages.caption.epochs=2", "stages.chat.epochs=1"]
    cut = workspace["run"] / "cut"
    train_until_ctrl_c(workspace, monkeypatch, 8, output=cut, overrides=sets)  # during the stage's last step (of 4)
    assert "non-finite" in (cut / "caption" / "rejects.jsonl").read_text()
    train(workspace["recipe"], output=cut, resume=True, overrides=sets, show_progress=False)
    lines = (cut / "caption" / "rejects.jsonl").read_text().splitlines()
    assert sum("non-finite" in line for line in lines) == 1


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(workspace, monkeypatch, capsys):
    sets = workspace["sets"] + ["stages.caption.epochs=2", "stages.chat.epochs=1", "runtime.save_interval=1"]
    full = train(workspace["recipe"], output=workspace["run"] / "full", overrides=sets, show_progress=False)
    train_until_ctrl_c(workspace, monkeypatch, 5, output=workspace["run"] / "cut", overrides=sets)
    checkpoints = workspace["run"] / "cut" / "caption" / "checkpoints"
    assert committed_steps(checkpoints) == [2, 3]
    (checkpoints / "step00000003" / "rank00000.safetensors").write_bytes(b"")  # a full disk, say
    resumed = train(workspace["recipe"], output=workspace["run"] / "cut", resume=True, overrides=sets,
                    show_progress=False)
    assert "checkpoint step 3 is damaged" in capsys.readouterr().out
    for a, b in zip(full.adapters, resumed.adapters):
        wa, wb = adapter_weights(a), adapter_weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_validate_reads_manifests_cheaply_and_names_what_would_be_rejected(workspace, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "", "caption": "x"}\nnot json\n' + Path(workspace["manifest"]).read_text())
    manifest.write_text(manifest.read_text().replace('"image": "1', f'"image": "{Path(workspace["manifest"]).parent}/1'))
    args = ["validate", workspace["recipe"]]
    for s in workspace["sets"]:
        args += ["--set", s]
    done = run_align(*args, "--set", f"stages.caption.data.0.manifest={manifest}")
    assert done.returncode == 0, done.stderr
    # The records whose relative paths now point beside the new manifest are not in the store (9 of 16).
    assert ("caption: 18 records (first 17 checked, would reject: 9 not in the feature store, 1 'image' names an "
            "empty path, 1 malformed") in done.stdout


@pytest.mark.slow
def test_validate_refuses_a_store_without_the_images_and_a_tokenizer_that_does_not_load(workspace, tmp_path):
    import shutil

    args = ["validate", workspace["recipe"]]
    for s in workspace["sets"]:
        args += ["--set", s]
    elsewhere = tmp_path / "elsewhere.jsonl"
    shutil.copy(workspace["manifest"], elsewhere)  # relative image paths, now resolved beside this copy
    done = run_align(*args, "--set", f"stages.caption.data.0.manifest={elsewhere}")
    assert done.returncode == 2 and "stage caption: none of the first 16 records' images is in the feature store" \
        in done.stderr, done.stderr
    rooted = run_align(*args, "--set", f"stages.caption.data.0.manifest={elsewhere}",
                       "--set", f"stages.caption.data.0.image_root={Path(workspace['manifest']).parent}")
    assert rooted.returncode == 0, rooted.stderr
    model = tmp_path / "llm"
    shutil.copytree(workspace["llama"], model)
    (model / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    broken = run_align(*args, "--set", f"backbone.model={model}")
    assert broken.returncode == 2 and "its tokenizer does not load from" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr


@pytest.mark.slow
def test_a_stage_validates_on_held_out_records_and_keeps_its_best_adapter(workspace):
    sets = workspace["sets"] + ["stages.chat.epochs=3", "stages.chat.eval={data: [{manifest: %s}], every: 2, "
                                                            "keep_best: val_loss}" % workspace["manifest"]]
    train(workspace["recipe"], overrides=sets, show_progress=False)
    chat = [r for r in metrics(workspace["run"]) if r["stage"] == "chat"]
    validated = [r["step"] for r in chat if "eval" in r]
    last = chat[-1]["step"]
    assert validated == sorted({s for s in range(2, last + 1, 2)} | {last})  # every 2 steps and at the end
    assert len({r["step"] for r in chat}) == len(chat)  # each step once: the validation is part of its step's line
    losses = {r["step"]: r["eval"]["val_loss"] for r in chat if "eval" in r}
    best = json.loads((workspace["run"] / "chat" / "best" / "best.json").read_text())
    assert best["value"] == min(losses.values()) and losses[best["step"]] == best["value"]
    assert load_adapter(workspace["run"] / "chat" / "best" / "adapter")[0].step == best["step"]
    caption = [r for r in metrics(workspace["run"]) if r["stage"] == "caption"]
    assert not any("eval" in r for r in caption)  # a stage without eval: nothing


@pytest.mark.slow
def test_the_validation_loss_does_not_depend_on_the_micro_batch_size(workspace, tmp_path):
    losses = []
    for micro in (1, 2):
        sets = workspace["sets"] + [f"runtime.output_dir={tmp_path / str(micro)}", "stages.caption.epochs=1",
                                    f"stages.caption.micro_batch_size={micro}",
                                    "stages.caption.eval={data: [{manifest: %s}]}" % workspace["manifest"]]
        train(workspace["recipe"], overrides=sets, show_progress=False)
        losses.append([r["eval"]["val_loss"] for r in metrics(tmp_path / str(micro)) if "eval" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_report_to_tensorboard_writes_the_steps_as_events(workspace):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(workspace["recipe"], overrides=workspace["sets"] + ["runtime.report_to=[tensorboard]"], show_progress=False)
    events = EventAccumulator(str(workspace["run"] / "tensorboard"))
    events.Reload()
    logged = [r["loss"] for r in metrics(workspace["run"]) if r["stage"] == "caption"]
    drawn = [e.value for e in events.Scalars("caption/loss")]
    assert drawn == pytest.approx(logged, rel=1e-6) and "chat/lr" in events.Tags()["scalars"]


@pytest.mark.slow
def test_a_benchmark_asked_during_training_answers_as_align_eval_does_afterwards(workspace, tmp_path):
    from align.tools.evaluate.benchmarks import align_jsonl
    from align.tools.evaluate.evaluate import evaluate_adapter, evaluate_during_training

    images = Path(workspace["manifest"]).parent
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"image": str(images / f"{i}.png"), "question": "What colour is it?",
                                             "answers": ["red"]}) + "\n" for i in range(6)))
    sets = workspace["sets"] + ["stages.chat.eval={benchmark: {kind: jsonl, files: {data: %s}, limit: 4}, every: 2, "
                                "at_start: true, keep_best: jsonl/exact_match}" % questions]
    with pytest.raises(AlignError, match="eval.benchmark needs an evaluator"):
        train(workspace["recipe"], overrides=sets, show_progress=False)
    train(workspace["recipe"], overrides=sets, show_progress=False, overwrite=True, evaluator=evaluate_during_training)
    chat = [r for r in metrics(workspace["run"]) if r["stage"] == "chat"]
    asked = [r for r in chat if "eval" in r]
    assert asked and asked[-1]["step"] == chat[-1]["step"]
    assert {"jsonl/accuracy", "jsonl/exact_match"} <= asked[-1]["eval"].keys()
    during = json.loads((workspace["run"] / "chat" / "eval" / f"step{chat[-1]['step']:08d}" / "results.json").read_text())
    # The same projector asked afterwards through align eval, images from the same store: the same greedy answers.
    after = evaluate_adapter(align_jsonl(questions, None), workspace["run"] / "chat" / "adapter", tmp_path / "after",
                             features=workspace["features"], limit=4, device="cpu", progress=False)
    assert [r["answer"] for r in during] == list(after.answers.values())
    # at_start: asked before the chat stage's first step, of the projector it starts from (the caption adapter).
    start = json.loads((workspace["run"] / "chat" / "eval" / "step00000000" / "results.json").read_text())
    before = evaluate_adapter(align_jsonl(questions, None), workspace["run"] / "caption" / "adapter", tmp_path / "before",
                              features=workspace["features"], limit=4, device="cpu", progress=False)
    assert [r["answer"] for r in start] == list(before.answers.values())
    best = json.loads((workspace["run"] / "chat" / "best" / "best.json").read_text())
    scores = {r["step"]: r["eval"]["jsonl/exact_match"] for r in asked}
    assert best["metric"] == "jsonl/exact_match" and best["value"] == max(scores.values())
    assert best["step"] == min(s for s, v in scores.items() if v == best["value"])  # the first of equals is kept


@pytest.mark.slow
def test_a_new_projector_starts_matched_to_the_llm_input_embeddings(workspace, tmp_path):
    from safetensors.torch import load_file as read_weights

    from align.adapters.projector import build_projector, embedding_statistics
    from align.tools.feature_store import FeatureStore

    store = FeatureStore.open(workspace["features"])
    images = Path(workspace["manifest"]).parent
    rows = [store.get(store.locate(images / f"{i}.png"))[0] for i in range(16)]
    features = torch.cat([torch.tensor(row, dtype=torch.float32) for row in rows])
    embeddings = read_weights(str(workspace["llama"] / "model.safetensors"))["model.embed_tokens.weight"]
    mean, spread = embedding_statistics(embeddings)
    frozen = [f"stages.{s}.{k}" for s in ("caption", "chat") for k in ("epochs=1", "steps_per_epoch=1",
              "lr={init_lr: 1.0e-30, min_lr: 0, warmup_lr: 0, warmup_steps: 0}")]
    starts = {}
    for init in ("matched", "default"):
        run = tmp_path / init
        train(workspace["recipe"], overrides=workspace["sets"] + frozen + [f"projector_init={init}",
              f"runtime.output_dir={run}"], show_progress=False)
        starts[init] = load_adapter(run / "caption" / "adapter")[1]  # a rate of 1e-30: the weights it started with
    width = features.shape[-1]
    torch.manual_seed(0)
    pytorch_init = build_projector("linear", width, 32).state_dict()
    assert all(torch.equal(v, pytorch_init[k]) for k, v in starts["default"].items())
    projector = build_projector("linear", width, 32)
    projector.load_state_dict(starts["matched"])
    out = projector(features).detach()
    # Matched on the stage's first samples (here all of the store's images): the words' mean and spread.
    assert torch.allclose(out.mean(0), mean, atol=0.02 * spread + 1e-6)
    assert float((out - out.mean(0)).square().mean().sqrt()) == pytest.approx(spread, rel=0.1)
