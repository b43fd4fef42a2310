"""Exit statuses of ``fastpref-train`` (and ``python -m fastpref.train``), in one place: the
``--help`` epilog, the README and docs/training.md list these."""

EXIT_OK = 0
"""The run reached ``--max_train_steps`` and saved its weights."""
EXIT_BAD_INPUT = 2
"""Bad input: one error line, nothing written (argparse's own status for a bad flag)."""
EXIT_NON_FINITE = 3
"""The loss or the trained weights became non-finite; the last good checkpoint is kept."""
EXIT_STOPPED = 75
"""Stopped by SIGTERM or SIGINT after writing a checkpoint (EX_TEMPFAIL of sysexits.h): a
scheduler may requeue the job with ``--resume_from_checkpoint latest``."""

EXIT_STATUSES = {
    EXIT_OK: "finished",
    EXIT_BAD_INPUT: "bad input (one error line, nothing written)",
    EXIT_NON_FINITE: "the loss or the weights became non-finite (the last good checkpoint is kept)",
    EXIT_STOPPED: "stopped by SIGTERM/SIGINT after writing a checkpoint (EX_TEMPFAIL: requeue with "
    "--resume_from_checkpoint latest)",
}


def exit_status_text() -> str:
    """One line per exit status, for the ``--help`` epilog."""
    return "Exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_STATUSES.items()) + "."
