"""Subprocesses of the tests with a hard timeout: on expiry the whole process tree (torchrun
and its workers, which torchrun starts in sessions of their own) is killed and the test fails
with a message saying what hung, instead of hanging CI."""

import os
import signal
import subprocess
from pathlib import Path

import pytest


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids of every visible process (Linux /proc; empty elsewhere)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (new sessions included)."""
    tree, pending, found = _children(), [pid], []
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(tree.get(current, []))
    for target in found:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, so ``kill_tree`` can stop it with all its children."""
    return subprocess.Popen(cmd, start_new_session=True, **popen)


def run(cmd: list[str], *, timeout: float, what: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run ``cmd`` (stdout and stderr captured as text) for at most ``timeout`` seconds. On expiry
    kill its whole tree and fail the test naming ``what``; with ``check`` a non-zero exit fails
    it too, with the output's tail."""
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(
            f"{what} did not finish within {timeout:g} s: killed it and all its child processes. "
            f"Last output:\n{(out or '')[-3000:]}"
        )
    finally:
        if proc.poll() is None:  # an exception in the test itself (KeyboardInterrupt)
            kill_tree(proc.pid)
    if check and proc.returncode != 0:
        pytest.fail(f"{what} exited with status {proc.returncode}. Last output:\n{out[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)
