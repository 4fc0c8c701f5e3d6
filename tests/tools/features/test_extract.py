"""Feature extraction into the store: equals a direct forward pass, rejects bad input, resumes, shards over ranks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from align.backbones.vision import load_encoder
from align.tools.features.extract import ExtractError, extract_features
from align.constants import STORE_SHARDS as SHARDS
from align.tools.feature_store import FeatureStore, StoreError
from align.backbones.vision.preprocessing import views
from align.tools.images import decode_image
from align.tools.runtime import free_port
from blip2_tiny import good_image, image_folder, write_manifest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def folder(tmp_path):
    return image_folder(tmp_path / "images")


def run(manifest, encoder, out, **options):
    options = {"workers": 0, "progress": False, "batch_size": 4, "max_pixels": 100_000, **options}
    return extract_features([manifest], encoder, out, **options)


def contents(store: FeatureStore) -> dict:
    """Everything a reader of the store can observe: key → row, and source → key."""
    return {"rows": {k: np.array(store.get(k)) for k in store.index}, "sources": dict(store.sources)}


def assert_same_contents(a: FeatureStore, b: FeatureStore, atol: float = 0.0):
    ca, cb = contents(a), contents(b)
    assert ca["sources"] == cb["sources"] and ca["rows"].keys() == cb["rows"].keys()
    for key in ca["rows"]:
        np.testing.assert_allclose(ca["rows"][key].astype(np.float32), cb["rows"][key].astype(np.float32), atol=atol)


def test_store_rows_equal_a_direct_forward_pass(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    encoder_dir = tiny_blip2[1]
    summary = run(manifest, encoder_dir, tmp_path / "store", n_views=2, strict_modes=True)
    store = FeatureStore.open(tmp_path / "store")
    encoder = load_encoder(encoder_dir)
    assert store.row_shape == (3, 4, 24) and summary.extracted == 6 == len(store)
    for i in range(6):
        source = str(manifest.parent / f"good{i}.png")
        data = Path(source).read_bytes()
        key = store.current_key(source)
        pixels = views(decode_image(data), encoder.preprocessing, 2, int(key[:15], 16))
        with torch.no_grad():
            direct = encoder.module(torch.from_numpy(pixels)).to(torch.float16).numpy()
        np.testing.assert_allclose(store.get(key).astype(np.float32), direct.astype(np.float32), atol=2e-3)
        assert not np.allclose(store.get(key)[0], store.get(key)[1])  # a training view is not the plain view


def test_every_bad_input_is_rejected_with_its_reason(tiny_blip2, folder, tmp_path):
    manifest, bad = folder
    summary = run(manifest, tiny_blip2[1], tmp_path / "store", strict_modes=True)
    rejects = [json.loads(line) for line in (tmp_path / "store" / "rejects.jsonl").read_text().splitlines()]
    by_source = {Path(r["source"]).name: r["reason"] for r in rejects}
    for name, reason in bad.items():
        assert reason in by_source[name], (name, by_source.get(name))
    broken_line = manifest.read_text().splitlines().index('{"image": "good1.png", "caption": ') + 1
    assert any("malformed manifest line" in r["reason"] and r["source"] == f"{manifest}:{broken_line}" for r in rejects)
    assert any("not a JSON object" in r["reason"] for r in rejects)
    assert any(r["reason"] == "record without an image" for r in rejects)
    assert summary.rejected == len(bad) + 3 and summary.extracted == 6
    store = FeatureStore.open(tmp_path / "store")
    # The byte-identical copy is encoded once and mapped to the same key.
    assert store.current_key(str(manifest.parent / "copy.png")) == store.current_key(str(manifest.parent / "good0.png"))
    assert summary.duplicates == 1 and len(store) == 6 and store.physical_rows == 6


def test_colour_modes_are_converted_unless_strict(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    summary = run(manifest, tiny_blip2[1], tmp_path / "store")
    assert summary.extracted == 6 + 4  # CMYK, palette, grayscale and alpha converted, as LAVIS and chat do
    with pytest.raises(StoreError, match="made by encoder"):  # a strict store is another store
        run(manifest, tiny_blip2[1], tmp_path / "store", strict_modes=True)


def test_16_bit_grayscale_keeps_its_levels(tmp_path):
    # PIL's convert("RGB") clips 16-bit values above 255: a dark-to-bright gradient came out pure white.
    from PIL import Image

    from align.tools.images import read_image

    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65520
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    decoded = np.asarray(read_image(tmp_path / "gray16.png"), dtype=np.float64)
    assert decoded.shape == (64, 64, 3) and (decoded[..., 0] == decoded[..., 2]).all()
    assert np.abs(decoded[..., 0] - levels / 257).max() <= 0.5


def test_fifos_symlink_loops_and_huge_files_are_rejected_without_reading_them(tiny_blip2, tmp_path, monkeypatch):
    from align.tools import images

    good_image(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "huge.png").write_bytes(b"\0" * 5000)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 4000)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": n, "caption": "x"} for n in
                                                     ("ok.png", "fifo.png", "loop.png", "huge.png", "folder")])
    (tmp_path / "folder").mkdir()
    summary = run(manifest, tiny_blip2[1], tmp_path / "store")
    reasons = {json.loads(l)["source"].rsplit("/", 1)[1]: json.loads(l)["reason"]
               for l in (tmp_path / "store" / "rejects.jsonl").read_text().splitlines()}
    assert summary.extracted == 1
    assert reasons["fifo.png"] == "not a regular file" and reasons["folder"] == "not a regular file (a folder)"
    assert reasons["loop.png"].startswith("unreadable file") and reasons["huge.png"].startswith("file too large")


def test_nothing_extractable_is_an_error(tiny_blip2, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "bad.png", "caption": "x"}])
    with pytest.raises(ExtractError, match="nothing could be extracted: 1 input"):
        run(manifest, tiny_blip2[1], tmp_path / "store")


def test_rerun_encodes_nothing_again(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    run(manifest, tiny_blip2[1], tmp_path / "store")
    again = run(manifest, tiny_blip2[1], tmp_path / "store")
    assert again.extracted == 0 and again.already_in_store == 11 and again.store_images == 10
    rejects = (tmp_path / "store" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == len(set(rejects))  # the same reject is not written twice


def test_an_image_changed_at_the_same_path_is_extracted_again(tiny_blip2, folder, tmp_path):
    # extract skipped any path it had seen and `find` answered the path's old key: a changed image kept its old
    # features forever (in training and chat), and verify said ok.
    manifest, _ = folder
    store_dir = tmp_path / "store"
    run(manifest, tiny_blip2[1], store_dir)
    image = manifest.parent / "good2.png"
    old_key = FeatureStore.open(store_dir).find(image)
    good_image(image, colour=(10, 220, 90), seed=7)  # new content, same path
    store = FeatureStore.open(store_dir)
    assert store.find(image) is None  # its bytes are not in the store: no old row for it
    with pytest.raises(StoreError, match="changed since it was extracted: image .*good2.png"):
        store.locate(image)
    verify = subprocess.run([sys.executable, "-m", "align", "features", "verify", store_dir], capture_output=True, text=True)
    assert verify.returncode == 2 and f"source {image} changed since it was extracted" in verify.stdout

    again = run(manifest, tiny_blip2[1], store_dir)
    assert again.extracted == 1 and again.already_in_store == 10
    store = FeatureStore.open(store_dir)
    new_key = store.find(image)
    assert new_key not in (None, old_key) and store.current_key(str(image)) == new_key
    expected = run(write_manifest(tmp_path / "one.jsonl", [{"image": str(image), "caption": "x"}]), tiny_blip2[1],
                   tmp_path / "fresh")
    np.testing.assert_array_equal(store.get(new_key), FeatureStore.open(tmp_path / "fresh").get(new_key))
    assert expected.extracted == 1

    os.utime(image, ns=(1, 1))  # touched (copied with another mtime), same bytes: recorded again, not encoded again
    touched = run(manifest, tiny_blip2[1], store_dir)
    assert touched.extracted == 0 and touched.duplicates == 1
    assert FeatureStore.open(store_dir).current_key(str(image)) == new_key


def test_store_refuses_another_encoder_or_shape(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    run(manifest, tiny_blip2[1], tmp_path / "store")
    with pytest.raises(StoreError, match="was made by encoder .* not 0000"):
        FeatureStore.open(tmp_path / "store", fingerprint="0000")
    with pytest.raises(StoreError, match=r"rows of shape \[1, 4, 24\], not \[3, 4, 24\]"):
        run(manifest, tiny_blip2[1], tmp_path / "store", n_views=2)


KILLER = """
import os, sys
from align.tools import feature_store
real = feature_store.write_atomic
commits = 0
def dying_write(path, data):
    global commits
    if path.suffix == ".json" and path.parent.name == "shards":
        commits += 1
        if commits == 3:
            os._exit(137)  # killed between writing a shard's rows and its commit record
    real(path, data)
feature_store.write_atomic = dying_write
from align.cli import main
sys.argv = ["align"] + sys.argv[1:]
main()
"""


def cli_extract(manifest, encoder, out, *extra, script=None):
    args = ["features", "extract", "--manifest", manifest, "--encoder", encoder, "--out", out, "--batch-size", "1",
            "--shard-images", "1", "--workers", "0", "--max-pixels", "100000", *extra]
    command = [sys.executable, "-c", script, *map(str, args)] if script else [sys.executable, "-m", "align", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    killed = cli_extract(manifest, tiny_blip2[1], tmp_path / "resumed", script=KILLER)
    assert killed.returncode == 137
    shards = tmp_path / "resumed" / SHARDS
    assert len(list(shards.glob("*.json"))) == 2 and len(list(shards.glob("*.f16"))) == 3  # one orphan row file
    assert len(FeatureStore.open(tmp_path / "resumed")) == 2  # a valid store, holding what was committed

    resumed = cli_extract(manifest, tiny_blip2[1], tmp_path / "resumed", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["extracted"] == 8  # only the unfinished images (4 of them converted modes)
    full = cli_extract(manifest, tiny_blip2[1], tmp_path / "full")
    assert full.returncode == 0, full.stderr
    assert_same_contents(FeatureStore.open(tmp_path / "resumed"), FeatureStore.open(tmp_path / "full"))
    assert not list(shards.glob("*.tmp")) and FeatureStore.open(tmp_path / "resumed").verify() == []


@pytest.mark.slow
def test_sigterm_and_kill_at_random_moments_lose_nothing_and_leave_no_worker(tiny_blip2, tmp_path):
    # SIGTERM killed extraction outright (nothing of the batch in hand kept) and a forked decode worker could outlive
    # it holding the store's lock. Interrupt at random moments mid-extraction, alternating SIGTERM and SIGKILL.
    import random
    import signal
    import time

    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(300):  # large enough that decoding takes a while in two workers
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
    manifest = write_manifest(tmp_path / "images" / "m.jsonl", [{"image": f"{i}.jpg", "caption": "x"} for i in range(300)])
    args = [sys.executable, "-m", "align", "features", "extract", "--manifest", str(manifest), "--encoder",
            str(tiny_blip2[1]), "--batch-size", "1", "--shard-images", "1", "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(args + ["--out", str(tmp_path / "full")], capture_output=True, text=True, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "cut"
    seed = random.randrange(10**6)
    moments = random.Random(seed)
    for attempt in range(4):
        kind = (signal.SIGTERM, signal.SIGKILL)[attempt % 2]
        process = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        committed = len(list((out / SHARDS).glob("*.json"))) if (out / SHARDS).is_dir() else 0
        wanted, deadline = committed + moments.randint(1, 60), time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline and (
                not (out / SHARDS).is_dir() or len(list((out / SHARDS).glob("*.json"))) < wanted):
            time.sleep(0.005)
        time.sleep(moments.uniform(0, 0.05))
        process.send_signal(kind)
        stderr = process.communicate(timeout=120)[1]
        if kind == signal.SIGTERM and process.returncode != 0:
            assert process.returncode == 130 and "Traceback" not in stderr, (seed, stderr[-2000:])
        time.sleep(0.5)  # a worker that outlived its parent would still be running now
        orphans = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        assert orphans == [], (seed, attempt, orphans)
        problems = FeatureStore.open(out).verify()  # a valid store after any moment: at worst (after SIGKILL
        if kind == signal.SIGKILL:                    # between a shard's two renames) rows the next run removes
            problems = [p for p in problems if not p.endswith("rows on disk without an index record")]
        assert problems == [], (seed, attempt, problems)
    finished = subprocess.run(args + ["--out", str(out), "--json"], capture_output=True, text=True, env=env)
    assert finished.returncode == 0, (seed, finished.stderr[-2000:])  # the lock is free, the rest is extracted
    assert_same_contents(FeatureStore.open(out), FeatureStore.open(tmp_path / "full"), atol=2e-3)


@pytest.mark.slow
def test_two_processes_make_the_same_store_as_one(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    single = cli_extract(manifest, tiny_blip2[1], tmp_path / "one", "--json")
    assert single.returncode == 0, single.stderr
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not installed")
    args = ["features", "extract", "--manifest", manifest, "--encoder", tiny_blip2[1], "--out", tmp_path / "two",
            "--batch-size", "2", "--workers", "0", "--max-pixels", "100000", "--json"]
    two = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "align", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    writers = {p.stem.rsplit("-", 1)[0] for p in (tmp_path / "two" / SHARDS).glob("*.json")}
    assert writers == {"run000001-r0", "run000001-r1"}
    assert_same_contents(FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two"), atol=2e-3)
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["count"] == 10
    # The reasons of every rank's rejects are reported (world > 1 reported none).
    reasons = json.loads(single.stdout)["reject_reasons"]
    assert reasons and json.loads(two.stdout)["reject_reasons"] == reasons


@pytest.mark.slow
def test_info_and_verify_commands(tiny_blip2, folder, tmp_path):
    manifest, _ = folder
    run(manifest, tiny_blip2[1], tmp_path / "store")
    info = subprocess.run([sys.executable, "-m", "align", "features", "info", tmp_path / "store", "--json"],
                          capture_output=True, text=True)
    data = json.loads(info.stdout)
    assert data["images"] == 10 and data["row_shape"] == [1, 4, 24] and data["rejects"] > 0
    ok = subprocess.run([sys.executable, "-m", "align", "features", "verify", tmp_path / "store"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok: 10 images" in ok.stdout

    shard = next((tmp_path / "store" / SHARDS).glob("*.f16"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "align", "features", "verify", tmp_path / "store"], capture_output=True, text=True)
    assert bad.returncode == 2 and "checksum mismatch" in bad.stdout and bad.stderr.startswith("error: ")

    # A deleted index record loses its rows: verify says so (meta.json's count, and the orphaned rows).
    next((tmp_path / "store" / SHARDS).glob("*.json")).unlink()
    lost = subprocess.run([sys.executable, "-m", "align", "features", "verify", tmp_path / "store"], capture_output=True, text=True)
    assert lost.returncode == 2 and "the index reaches" in lost.stdout and "without an index record" in lost.stdout


@pytest.mark.slow
def test_a_second_extraction_into_a_busy_store_is_refused_and_a_failed_one_leaves_no_store(tiny_blip2, folder, tmp_path):
    from align.files import FolderLock

    manifest, _ = folder
    with FolderLock(tmp_path / "store", "store"):
        busy = subprocess.run([sys.executable, "-m", "align", "features", "extract", "--manifest", manifest, "--encoder",
                               tiny_blip2[1], "--out", tmp_path / "store"], capture_output=True, text=True)
    assert busy.returncode == 2 and "is in use by another align job (pid" in busy.stderr
    broken = write_manifest(tmp_path / "broken.jsonl", [{"image": "missing.png", "caption": "x"}])
    failed = subprocess.run([sys.executable, "-m", "align", "features", "extract", "--manifest", broken, "--encoder",
                             tiny_blip2[1], "--out", tmp_path / "new"], capture_output=True, text=True)
    assert failed.returncode == 2 and "nothing could be extracted" in failed.stderr
    assert not (tmp_path / "new").exists() and (tmp_path / "new.rejects.jsonl").is_file()


@pytest.mark.slow
def test_cli_errors_are_one_line(tiny_blip2, tmp_path):
    good_image(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "x"}])
    for args in (
        ["features", "extract", "--manifest", tmp_path / "none.jsonl", "--encoder", tiny_blip2[1], "--out", tmp_path / "s"],
        ["features", "extract", "--manifest", manifest, "--encoder", tmp_path / "no-encoder", "--out", tmp_path / "s"],
        ["features", "info", tmp_path / "not-a-store"],
    ):
        result = subprocess.run([sys.executable, "-m", "align", *map(str, args)], capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_decoding_workers_follow_the_cores_and_the_data_size(monkeypatch):
    from align.tools.features.extract import default_workers

    monkeypatch.setattr("torch.get_num_threads", lambda: 2)  # this job's share of the cores
    assert default_workers(48, 32) == 0  # a couple of batches: workers would cost more than they save
    assert default_workers(10_000, 32) == 1  # two cores: the encoder keeps one, decoding gets the other
    monkeypatch.setattr("torch.get_num_threads", lambda: 1)
    assert default_workers(10_000, 32) == 0  # a busy machine's single core: no decoding process beside it
    monkeypatch.setattr("torch.get_num_threads", lambda: 64)
    assert default_workers(10_000, 32) == 8
