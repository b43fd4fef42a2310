"""Process-group set-up and teardown, and the tests' subprocess timeout (no torchrun needed)."""

import os
import sys
import time

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import proc_helpers
import pytest
import torch
import torch.distributed as dist

from fastpref.training.distributed import DistState, cleanup, select_device


def test_device_per_local_rank_cpu_and_too_few_gpus():
    assert select_device(0, 2, cuda_available=False, device_count=0) == torch.device("cpu")
    assert select_device(1, 2, cuda_available=True, device_count=0) == torch.device("cpu")
    assert select_device(1, 2, cuda_available=True, device_count=2) == torch.device("cuda", 1)
    assert select_device(3, 4, cuda_available=True, device_count=8) == torch.device("cuda", 3)
    with pytest.raises(
        ValueError,
        match="at most one process per GPU, got 2 processes on this node and 1 visible GPU.*CUDA_VISIBLE_DEVICES=''",
    ):
        select_device(1, 2, cuda_available=True, device_count=1)


def test_cleanup_drops_the_ddp_reducer_before_destroying_the_group(tmp_path, monkeypatch):
    """A one-process gloo group: when destroy_process_group runs, the Reducer is already gone."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(1, 3)).sum().backward()
    seen = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(
        dist,
        "destroy_process_group",
        lambda: (seen.append("reducer" in model.__dict__ or "logger" in model.__dict__), destroy()),
    )
    try:
        cleanup(DistState(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")), model)
    finally:
        if dist.is_initialized():
            destroy()
    assert seen == [False] and not dist.is_initialized()
    assert model.module(torch.ones(1, 3)).shape == (1, 2)  # the wrapped module stays usable


def test_subprocess_timeout_fails_clearly_and_kills_a_grandchild_in_its_own_session(tmp_path):
    """Like torchrun's workers, the grandchild starts a session of its own; it must die too."""
    pid_file = tmp_path / "pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    child = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}], "
        f"stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True); time.sleep(600)"
    )
    with pytest.raises(pytest.fail.Exception, match="sleeper did not finish within 3 s: killed it and all"):
        proc_helpers.run([sys.executable, "-c", child], timeout=3, what="sleeper")
    pid = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, 9)
        pytest.fail(f"grandchild {pid} survived the timeout")


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_subprocess_failure_shows_its_output():
    with pytest.raises(pytest.fail.Exception, match="(?s)boom exited with status 3.*last words"):
        proc_helpers.run([sys.executable, "-c", "print('last words'); raise SystemExit(3)"], timeout=60, what="boom")
    assert proc_helpers.run([sys.executable, "-c", "print(1)"], timeout=60, what="ok").stdout == "1\n"
