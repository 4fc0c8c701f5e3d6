"""The render cache and the data order: what the trainer reads, sample by sample and batch by batch."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from align.backbones.chat_templates import template_for
from align.backbones.registry import backbone_tokenizer, get_backbone
from align.templates import IGNORE_INDEX, render
from align.tools.feature_store import FeatureStore
from align.tools.training import render_cache
from align.tools.training.data_order import DataOrder, permute, key_of, shares
from align.tools.training.render_cache import RenderCache, RenderSettings, build_cache
from align.tools.training.training_data import prompted, training_conversation
from blip2_tiny import write_manifest


@pytest.fixture
def workspace(train_workspace, monkeypatch):
    monkeypatch.setenv("ALIGN_HOME", str(train_workspace["home"]))
    return train_workspace


def settings(ws, manifests, **changes) -> RenderSettings:
    values = dict(backbone="tiny-llama", model=str(ws["llama"]), template="caption", system=None, max_length=64,
                  prompts=None, truncate="reply", seed=0, num_query_tokens=4, store=str(ws["features"]),
                  manifests=tuple(str(m) for m in manifests), image_roots=(None,) * len(manifests))
    values.update(changes)
    return RenderSettings(**values)


def store_row(ws, image: str) -> int:
    """The cache's row number of one of the workspace's images."""
    store = FeatureStore.open(ws["features"])
    location = store.index[store.find(Path(ws["manifest"]).parent / image)]
    shards = sorted({loc.shard for loc in store.index.values()})
    return (shards.index(location.shard) << 32) + location.row


def test_one_image_list_per_record_and_every_bad_record_rejected_with_its_reason(workspace, tmp_path):
    data = Path(workspace["manifest"]).parent
    long_caption = " ".join(["a red picture"] * 40)
    manifest = write_manifest(tmp_path / "mixed.jsonl", [
        {"image": "", "caption": "an empty image path"},                                 # 1: reject
        {"image": str(data / "0.png"), "caption": "a red picture"},                      # 2: kept
        {"image": str(data / "0.png"), "caption": "a red picture"},                      # 3: a duplicate, kept
        {"image": str(data / "missing.png"), "caption": "not extracted"},                # 4: reject
        {"image": str(data / "1.png"), "caption": long_caption},                         # 5: cut to fit
        {"image": [str(data / "2.png"), str(data / "3.png")], "conversations": [         # 6: two images
            {"from": "human", "value": "<image> then <image>: which colours?"}, {"from": "gpt", "value": "two"}]},
        {"image": str(data / "0.png"), "conversations": [{"from": "human", "value": "<image> hi"}]},  # 7: reject
        {"image": [str(data / "0.png"), ""], "caption": "a list with an empty path"},   # 8: reject
    ])
    cache = RenderCache(build_cache(settings(workspace, [manifest], template="vicuna-v1.1", max_length=200),
                                    tmp_path / "cache", workers=1, progress=False))
    assert len(cache) == 4 and cache.meta["rejected"] == 4 and cache.meta["truncated"] == 1
    reasons = {json.loads(line)["source"].rsplit(":", 1)[1]: json.loads(line)["reason"]
               for line in (cache.path / "rejects.jsonl").read_text().splitlines()}
    assert reasons["1"] == reasons["8"] == "'image' names an empty path"
    assert reasons["4"].startswith("not in the feature store: image") and "nothing to learn" in reasons["7"]
    kept, long_one, two = cache.samples(np.arange(4), epoch=0)[0], *cache.samples(np.array([2, 3]), epoch=0)
    assert kept.rows == [store_row(workspace, "0.png")]
    assert two.rows == [store_row(workspace, "2.png"), store_row(workspace, "3.png")]  # slot order
    assert [length for _, length in two.images] == [4, 4] and two.images[0][0] < two.images[1][0]
    assert len(long_one.input_ids) <= 200 and long_one.labels[-1] == 2  # the reply's end (</s>) is kept, learnt
    assert sum(label != IGNORE_INDEX for label in long_one.labels) > 20


def test_an_image_changed_since_extraction_is_a_reject_not_its_old_features(workspace, tiny_blip2, tmp_path):
    # The store answered the path with the old image's row: training learnt the new caption on the old picture.
    from align.tools.features.extract import extract_features
    from blip2_tiny import good_image

    picture = good_image(tmp_path / "pic.png", (200, 50, 50))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "pic.png", "caption": "a red picture"}])
    extract_features([manifest], tiny_blip2[1], tmp_path / "store", workers=0, progress=False, n_views=1)
    fresh = RenderCache(build_cache(settings(workspace, [manifest], store=str(tmp_path / "store")), tmp_path / "c1",
                                    workers=1, progress=False))
    assert len(fresh) == 1
    good_image(picture, (20, 20, 220))  # now a blue picture, same path
    stale = RenderCache(build_cache(settings(workspace, [manifest], store=str(tmp_path / "store")), tmp_path / "c2",
                                    workers=1, progress=False))
    assert len(stale) == 0 and stale.meta["rejected"] == 1
    reason = json.loads((stale.path / "rejects.jsonl").read_text())["reason"]
    assert reason.startswith("changed since it was extracted: image") and "extract again" in reason


def test_a_data_sources_image_root_finds_images_extracted_with_image_root(workspace, tmp_path):
    # `features extract --image-root DIR` resolved the manifest's relative paths against DIR; training resolved them
    # against the manifest's folder and rejected every record.
    from align.tools.training.recipe import load_recipe

    (tmp_path / "lists").mkdir()
    elsewhere = write_manifest(tmp_path / "lists" / "captions.jsonl", [{"image": "0.png", "caption": "a red picture"}])
    images = str(Path(workspace["manifest"]).parent)
    alone = RenderCache(build_cache(settings(workspace, [elsewhere]), tmp_path / "c1", workers=1, progress=False))
    assert len(alone) == 0 and alone.meta["rejected"] == 1
    rooted = RenderCache(build_cache(settings(workspace, [elsewhere], image_roots=(images,)), tmp_path / "c2",
                                     workers=1, progress=False))
    assert len(rooted) == 1 and rooted.samples(np.arange(1), epoch=0)[0].rows == [store_row(workspace, "0.png")]
    recipe = tmp_path / "lists" / "r.yaml"
    recipe.write_text("backbone: {name: tiny-llama}\nfeatures: f\nstages:\n- {name: s, data: [{manifest: "
                      "captions.jsonl, image_root: ../pictures}], global_batch_size: 1, lr: {init_lr: 0.1}}\n")
    source = load_recipe(recipe).stages[0].data[0]
    assert source.image_root == tmp_path / "lists" / ".." / "pictures"  # read paths: relative to the recipe


def test_written_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    from align.tools.training.recipe import SHIPPED_RECIPES, load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(SHIPPED_RECIPES / "minigpt4qwen-7b.yaml")
    assert recipe.runtime.output_dir == tmp_path / "runs" / "minigpt4qwen-7b"  # never inside the package
    assert recipe.stages[0].data[0].manifest == tmp_path / "data" / "minigpt4qwen_instructions.jsonl"
    (tmp_path / "mine").mkdir()
    copied = tmp_path / "mine" / "r.yaml"
    copied.write_text((SHIPPED_RECIPES / "minigpt4qwen-7b.yaml").read_text())
    recipe = load_recipe(copied)
    assert recipe.runtime.output_dir == tmp_path / "runs" / "minigpt4qwen-7b"
    assert recipe.stages[0].data[0].manifest == tmp_path / "mine" / "data" / "minigpt4qwen_instructions.jsonl"


def test_a_damaged_render_cache_is_built_again(workspace, tmp_path, capsys):
    # A cache whose arrays lost bytes (a full disk, a bad copy) crashed --resume with a numpy traceback.
    from align.errors import AlignError

    made = settings(workspace, [workspace["manifest"]])
    path = build_cache(made, tmp_path / "cache", workers=1, progress=False)
    expected = RenderCache(path).samples(np.arange(3), epoch=0)
    tokens = path / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-6])
    with pytest.raises(AlignError, match="render cache .* is damaged \\(tokens.bin holds"):
        RenderCache(path)
    assert build_cache(made, tmp_path / "cache", workers=1, progress=False) == path
    assert "is damaged" in capsys.readouterr().err
    assert RenderCache(path).samples(np.arange(3), epoch=0) == expected


def test_a_second_builder_of_the_same_cache_waits_and_reuses_it(workspace, tmp_path):
    # Two runs sharing runtime.render_cache: the second deleted the first's live `<key>.tmp-*` folder.
    import threading

    from filelock import FileLock

    made = settings(workspace, [workspace["manifest"]])
    key = render_cache.cache_key(made, render_cache.store_shard_names(Path(made.store)))
    root = tmp_path / "caches"
    root.mkdir()
    live = root / f"{key}.tmp-999999"  # the first builder, at work
    live.mkdir()
    built = {}
    with FileLock(root / f".{key}.lock"):
        second = threading.Thread(target=lambda: built.update(path=build_cache(made, root, workers=1, progress=False)))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and live.is_dir()  # it waits; the live builder's folder is untouched
    # The first builder was killed without a cache: the second, now alone, clears its leftovers and builds it.
    second.join()
    assert built["path"] == root / key and len(RenderCache(built["path"])) == 16 and not live.exists()


def test_the_cache_key_follows_what_the_store_rows_mean_not_its_shard_names(workspace, tmp_path):
    # A store deleted and extracted again in another order into the same path kept its shard names: the old cache
    # was reused and every sample pointed at another image's row.
    import shutil

    store = tmp_path / "store"
    shutil.copytree(workspace["features"], store)
    made = settings(workspace, [workspace["manifest"]], store=str(store))
    names = render_cache.store_shard_names(store)
    before = render_cache.cache_key(made, names)
    index = store / "shards" / f"{names[0]}.json"
    record = json.loads(index.read_text())
    record["keys"][0], record["keys"][1] = record["keys"][1], record["keys"][0]  # two images' rows swapped
    index.write_text(json.dumps(record))
    assert render_cache.store_shard_names(store) == names and render_cache.cache_key(made, names) != before


def test_a_prompted_caption_record_keeps_its_system_text():
    record = prompted({"image": "x.png", "caption": "a red picture", "system": "You describe pictures."}, "Describe.")
    conversation = training_conversation(record)
    assert conversation.system == "You describe pictures."
    assert [m.text for m in conversation.messages] == ["<image> Describe.", "a red picture"]


def test_caption_cut_to_fit_keeps_eos_and_never_an_image(workspace):
    spec = get_backbone("tiny-llama")
    tokenizer = backbone_tokenizer(spec, workspace["llama"])
    template = template_for(spec, tokenizer, name="caption", model=workspace["llama"])
    conversation = training_conversation({"image": "x.png", "caption": "a red picture " * 30})
    rendered = render(template, conversation, tokenizer, num_query_tokens=4, max_length=24, truncate="reply")
    assert len(rendered.input_ids) <= 24 and rendered.truncated
    assert rendered.images == [(1, 4)] and rendered.input_ids[-1] == tokenizer.eos_id
    assert rendered.labels[-1] == tokenizer.eos_id
    with pytest.raises(Exception, match="the first exchange alone is"):
        render(template, conversation, tokenizer, num_query_tokens=4, max_length=24, truncate="turns")
    with pytest.raises(Exception, match="the prompt and the reply's end alone"):
        render(template, conversation, tokenizer, num_query_tokens=4, max_length=5, truncate="reply")


def test_cache_is_reused_and_rebuilt_when_anything_that_decides_it_changes(workspace, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", json.loads("[" + ",".join(
        Path(workspace["manifest"]).read_text().splitlines()) + "]"))
    manifest.write_text(manifest.read_text().replace('"image": "', f'"image": "{Path(workspace["manifest"]).parent}/'))
    base = settings(workspace, [manifest])
    first = build_cache(base, tmp_path / "cache", workers=1, progress=False)
    assert build_cache(base, tmp_path / "cache", workers=1, progress=False) == first
    assert build_cache(settings(workspace, [manifest], max_length=63), tmp_path / "cache", 1, False) != first
    with manifest.open("a") as more:
        more.write(json.dumps({"image": str(Path(workspace["manifest"]).parent / "0.png"), "caption": "new"}) + "\n")
    rebuilt = build_cache(base, tmp_path / "cache", workers=1, progress=False)
    assert rebuilt != first and len(RenderCache(rebuilt)) == len(RenderCache(first)) + 1
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_parallel_build_equals_serial(workspace, tmp_path, monkeypatch):
    monkeypatch.setattr(render_cache, "CHUNK_BYTES", 200)  # many chunks, rendered out of order by two processes
    manifest = workspace["manifest"]
    serial = RenderCache(build_cache(settings(workspace, [manifest]), tmp_path / "one", 1, False))
    parallel = RenderCache(build_cache(settings(workspace, [manifest]), tmp_path / "two", 2, False))
    assert len(serial) == len(parallel) == 16
    for name in render_cache.ARRAYS:
        assert np.array_equal(serial.arrays[name], parallel.arrays[name]), name


def test_prompts_are_drawn_per_epoch_and_join_exactly(workspace, tmp_path):
    prompts = ("<image> Describe this image.", "<image> What is in this picture?", "<image> Say what you see.")
    manifest = workspace["manifest"]
    made = settings(workspace, [manifest], template="minigpt4-stage2", prompts=prompts, max_length=300)
    cache = RenderCache(build_cache(made, tmp_path / "cache", 1, False))
    assert cache.meta["prompts_per_epoch"] and len(cache.prefixes) == 3
    spec = get_backbone("tiny-llama")
    tokenizer = backbone_tokenizer(spec, workspace["llama"])
    template = template_for(spec, tokenizer, name="minigpt4-stage2", model=workspace["llama"])
    records = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    seen = set()
    for epoch in range(4):
        for i, sample in enumerate(cache.samples(np.arange(16), epoch)):
            prompt = next(p for p in prompts if sample.input_ids[:30] == render(
                template, training_conversation(prompted(records[i], p)), tokenizer, num_query_tokens=4).input_ids[:30])
            expected = render(template, training_conversation(prompted(records[i], prompt)), tokenizer,
                              num_query_tokens=4)
            assert (sample.input_ids, sample.labels, sample.images) == (expected.input_ids, expected.labels, expected.images)
            seen.add((i, prompt))
    assert len({prompt for i, prompt in seen if i == 0}) > 1  # one record, several prompts over epochs

    unspliced = settings(workspace, [manifest], template="vicuna-v1.1", prompts=prompts, max_length=300)
    assert not RenderCache(build_cache(unspliced, tmp_path / "cache", 1, False)).meta["prompts_per_epoch"]


# -- data order ----------------------------------------------------------------------------------------------------


def test_permutations_are_bijections():
    for size in (1, 2, 3, 5, 64, 1000, 4097):
        assert sorted(permute(np.arange(size), size, key_of(7, size)).tolist()) == list(range(size))
    assert permute(np.arange(50), 50, key_of(1)).tolist() != permute(np.arange(50), 50, key_of(2)).tolist()


def test_one_source_is_read_once_per_pass():
    order = DataOrder([96], [1.0], global_batch=16, seed=3)
    assert order.steps_per_epoch == 6
    for epoch in range(3):
        ids = np.concatenate([order.sample_ids(epoch, s) for s in range(6)])
        assert sorted(ids.tolist()) == list(range(96))
    assert order.sample_ids(0, 0).tolist() != order.sample_ids(1, 0).tolist()


def test_mixed_sources_are_passed_exactly_at_their_ratio():
    order = DataOrder([100, 30], [1.0, 1.0], global_batch=16, seed=0)
    counts = Counter(np.concatenate([order.sample_ids(0, s) for s in range(order.steps_per_epoch)]).tolist())
    big, small = [counts[i] for i in range(100)], [counts[i] for i in range(100, 130)]
    assert sum(big) == sum(small) == order.draws // 2  # 1:1 by draws
    assert min(big) >= 1 and max(big) - min(big) <= 1  # every sample of the large source, once (a few twice)
    assert min(small) >= 3 and max(small) - min(small) <= 1  # the small source repeats in whole passes
    # Two epochs continue through the passes: every sample is seen as often as any other, to within one.
    two = Counter(np.concatenate([order.sample_ids(e, s) for e in range(2) for s in range(order.steps_per_epoch)]).tolist())
    assert max(two[i] for i in range(100)) - min(two[i] for i in range(100)) <= 1


def test_batches_are_a_pure_function_of_seed_epoch_and_step():
    a, b = DataOrder([40, 7], [3.0, 1.0], 8, seed=5), DataOrder([40, 7], [3.0, 1.0], 8, seed=5)
    assert all(np.array_equal(a.sample_ids(e, s), b.sample_ids(e, s)) for e in range(2) for s in range(4))
    assert not np.array_equal(a.sample_ids(0, 0), DataOrder([40, 7], [3.0, 1.0], 8, seed=6).sample_ids(0, 0))
    assert shares(10, [3.0, 1.0]) == [8, 2] and shares(7, [1.0, 1.0, 1.0]) == [3, 2, 2]


def test_steps_per_epoch_shorter_than_the_data_continues_next_epoch():
    order = DataOrder([64], [1.0], global_batch=8, seed=0, steps_per_epoch=2)
    ids = np.concatenate([order.sample_ids(e, s) for e in range(4) for s in range(2)])
    assert sorted(ids.tolist()) == list(range(64))  # four short epochs make one whole pass
