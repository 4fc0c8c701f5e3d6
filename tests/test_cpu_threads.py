"""Every process align starts gets a share of the cores; a thread count the user set is kept."""

import os
import subprocess
import sys

import pytest

from align import cpu_threads
from align.cpu_threads import share_cores, thread_share


@pytest.fixture
def four_cores_one_busy(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 1)
    for name in cpu_threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_the_free_cores_are_shared_among_the_processes_started_together(four_cores_one_busy):
    assert [thread_share(n) for n in (1, 2, 3, 8)] == [3, 1, 1, 1]


def test_the_share_is_set_for_this_process_and_its_children(four_cores_one_busy):
    assert share_cores(1) == 3
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"


def test_a_thread_count_the_user_set_is_kept(four_cores_one_busy, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert share_cores(1) == 2 and os.environ["OMP_NUM_THREADS"] == "2"


@pytest.mark.slow
def test_the_align_command_gives_torch_the_share_of_each_rank():
    # torchrun's LOCAL_WORLD_SIZE processes share the cores; torch sizes its pool from the variable set before it.
    code = ("import os, sys; sys.argv = ['align', '--version']; from align import cli\ntry: cli.main()\n"
            "except SystemExit: pass\nimport torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in cpu_threads.THREAD_VARIABLES} | {"LOCAL_WORLD_SIZE": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    threads, decided = map(int, out.split()[-2:])
    assert threads == decided <= max(1, cpu_threads.usable_cores() // 2)


def test_busy_cores_are_measured_now_not_from_the_minutes_before():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert cpu_threads.busy_cores(window=0.5) >= 1  # the spinning process, whatever the load average says
    finally:
        busy.kill()
        busy.wait()
