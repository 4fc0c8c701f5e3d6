"""Files a job writes in a folder others can write to: never through a symbolic link planted there."""

import pytest

from align.errors import AlignError
from align.files import FolderLock, open_own
from align.tools.rejects import RejectLog


@pytest.fixture
def victim(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    return target


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path, victim):
    # `STORE/.align.lock -> ~/file` was truncated and overwritten with "pid N" by the next extraction.
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / FolderLock.NAME).symlink_to(victim)
    with pytest.raises(AlignError, match="is a symbolic link"):
        with FolderLock(folder, "store"):
            pass
    assert victim.read_text() == "precious\n"


def test_logs_and_outputs_are_never_appended_through_a_link(tmp_path, victim):
    (tmp_path / "rejects.jsonl").symlink_to(victim)
    with pytest.raises(AlignError, match="is a symbolic link"):
        RejectLog(tmp_path / "rejects.jsonl")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(AlignError, match="is a symbolic link"):
        open_own(tmp_path / "metrics.jsonl")
    assert victim.read_text() == "precious\n"
    with open_own(tmp_path / "plain.jsonl") as plain:  # a file of its own is created and appended to
        plain.write("one\n")
    with open_own(tmp_path / "plain.jsonl") as plain:
        plain.write("two\n")
    assert (tmp_path / "plain.jsonl").read_text() == "one\ntwo\n"


def test_a_forked_child_never_keeps_the_lock_of_a_killed_parent(tmp_path):
    # Above 128 images extraction forks decode workers; SIGTERM killed the parent and an orphan worker held the
    # store "in use by pid <dead>" forever.
    import subprocess
    import sys

    code = f"""
import os, time
from align.files import FolderLock
lock = FolderLock(__import__("pathlib").Path({str(tmp_path)!r}), "store").__enter__()
if os.fork() == 0:
    time.sleep(30)  # the orphaned worker
    os._exit(0)
os._exit(0)  # the parent dies without releasing anything, as under SIGKILL
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with FolderLock(tmp_path, "store"):  # free again, while the orphan still sleeps
        pass
