"""A full disk and a read-only folder, on real small file systems: every writer ends in one line that names the folder
(and the space), leaves no temporary or half-written file, and a job with nothing to write runs on a read-only one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for one test (needs root, as CI and this machine have; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the disk."""
    stats = os.statvfs(disk)
    (disk / "fill").write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def align(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGN_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "align", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def leftovers(disk: Path) -> list[str]:
    """What a failed job left on the disk besides the filler and the lock files it held."""
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*")
                  if p.is_file() and p.name != "fill" and not p.name.endswith(".lock") and p.name != "recipe.json")


def commands(ws: dict, encoder: Path, disk: Path, scratch: Path) -> dict[str, list]:
    recipe, overrides = tiny_recipe(ws, scratch)
    llava = scratch / "llava.json"
    llava.write_text('[{"image": "0.png", "conversations": [{"from": "human", "value": "<image> What?"}, '
                     '{"from": "gpt", "value": "' + "A red picture. " * 400 + '"}]}]')
    return {
        "features extract": ["features", "extract", "--manifest", ws["manifest"], "--encoder", encoder,
                             "--out", disk / "store", "--workers", "0"],
        "encoder export": ["encoder", "export", "--from", encoder, "--out", disk / "encoder"],
        "data convert": ["data", "convert", "--format", "llava", llava, "--out", disk / "m.jsonl"],
        "train": ["train", recipe, "--output", disk / "run", *[a for o in overrides for a in ("--set", o)]],
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["features extract", "encoder export", "data convert", "train"])
def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing_half_written(
        train_workspace, tiny_blip2, small_disk, tmp_path, command):
    # Every writer ended in a traceback, and shard or cache temporaries stayed behind.
    args = commands(train_workspace, tiny_blip2[1], small_disk, tmp_path)[command]
    fill(small_disk, 4096)
    line = one_error_line(align(*args, home=train_workspace["home"]))
    assert "no space left on device" in line and f"free space for {small_disk}" in line, line
    assert leftovers(small_disk) == []
    assert not (small_disk / "store").exists()  # a store the job made and could not fill is removed


@pytest.mark.slow
def test_a_read_only_folder_runs_a_job_with_nothing_to_write_and_refuses_one_that_writes(
        train_workspace, tiny_blip2, small_disk, tmp_path):
    home = train_workspace["home"]
    extract = commands(train_workspace, tiny_blip2[1], small_disk, tmp_path)["features extract"]
    assert align(*extract, home=home).returncode == 0
    remount(small_disk, "ro")
    try:
        again = align(*extract, home=home)  # everything is in the store: nothing to write, so nothing fails
        assert again.returncode == 0 and "0 extracted" in again.stdout, again.stderr[-2000:]
        more = write_manifest_with_new_image(tmp_path)
        line = one_error_line(align("features", "extract", "--manifest", more, "--encoder", tiny_blip2[1],
                                    "--out", small_disk / "store", "--workers", "0", home=home))
        assert "read-only file system" in line and f"{small_disk / 'store' / 'shards'} must be writable" in line
        line = one_error_line(align("encoder", "export", "--from", tiny_blip2[1], "--out", small_disk / "enc",
                                    home=home))
        assert "read-only file system" in line and f"{small_disk} must be writable" in line
    finally:
        remount(small_disk, "rw")


def write_manifest_with_new_image(folder: Path) -> Path:
    from blip2_tiny import good_image, write_manifest

    good_image(folder / "new.png", (1, 2, 3), seed=11)
    return write_manifest(folder / "new.jsonl", [{"image": "new.png", "caption": "a new picture"}])
