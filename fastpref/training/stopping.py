"""Stopping without losing work: SIGTERM or SIGINT (Ctrl-C) lets the current step finish, then
the trainer writes a checkpoint and exits with status 75 (``exits.EXIT_STOPPED``, EX_TEMPFAIL, so
a scheduler can requeue); ``--resume_from_checkpoint latest`` continues from
it. A second signal stops at once (SIGINT raises KeyboardInterrupt, SIGTERM its default)."""

import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT into ``requested = True``."""

    def __init__(self):
        self.requested = False
        self.stopped = False
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:  # the second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.requested = True

    def agreed(self, state, check_now: bool) -> bool:
        """Whether every process stops after this step. Alone: the flag. Several processes:
        only at ``check_now`` steps (logging steps), from a MAX all-reduce of the flags, so all
        stop after the same step."""
        if not state.enabled:
            self.stopped = self.requested
            return self.stopped
        if not check_now:
            return False
        flag = torch.tensor([float(self.requested)], device=state.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped = bool(flag.item())  # host-ok: logging step, outside the captured step
        return self.stopped
