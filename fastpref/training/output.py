"""What rank 0 writes while a run trains: the output directory at the start (``args.json`` or the
resume record, the metrics logger, the skipped rows) and each ``checkpoint-<step>`` with the
pruning after it (``fastpref.training.checkpoint`` has the file format). The final weights are
the model family's (``ModelFamily.save_weights``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastpref.training.checkpoint import prune_checkpoints, record_resume, remove_orphans, save_checkpoint
from fastpref.training.data import log_skipped_rows
from fastpref.training.distributed import barrier
from fastpref.training.logging import MetricsLogger
from fastpref.training.models import trainable_state
from fastpref.training.replay import REPLAY_FILE

if TYPE_CHECKING:
    from fastpref.training.run import Run


def start_output(run: Run, output_dir: Path) -> MetricsLogger | None:
    """Rank 0: the output directory, ``args.json`` (the config) and the metrics logger."""
    logger = None
    if run.dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(output_dir)
        if run.resumed is None:
            (output_dir / "args.json").write_text(json.dumps(run.config.as_dict(), indent=1))
        else:  # args.json keeps the original run's flags; resume-<step>.json what this resume changed
            record_resume(output_dir, run.config.as_dict(), *run.resumed, run.start_step)
        logger = MetricsLogger(output_dir, run.config.report_to, resume_step=run.start_step)
        if run.online is not None and run.resumed is None:
            run.online.clear()
        if run.config.skip_bad_rows:
            log_skipped_rows(run.skipped_rows, output_dir)
    barrier(run.dist)
    return logger


def write_checkpoint(run: Run, logger: MetricsLogger | None, output_dir: Path, step: int, position: int) -> None:
    """Rank 0: ``checkpoint-<step>`` (trainable tensors, optimizer, schedule, data position,
    SSPO's pool), then pruning to ``--checkpoints_total_limit``; every rank waits for it.
    ``--fsdp``: every process writes its shards (``ShardedRun.save_checkpoint``)."""
    if run.sharded is not None:
        if run.dist.is_main:
            logger.flush()
        run.sharded.save_checkpoint(
            output_dir,
            step,
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            data_position=position,
            config=run.config.as_dict(),
        )
        if run.dist.is_main:
            prune_checkpoints(output_dir, run.config.checkpoints_total_limit)
        barrier(run.dist)
        return
    if run.dist.is_main:
        logger.flush()
        extra, files = {}, {}
        if run.replay is not None:
            files[REPLAY_FILE], extra["sspo_pool_steps"] = run.replay.state()
        save_checkpoint(
            output_dir,
            step,
            trainable=trainable_state(run.family.denoiser, run.config.reference),
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            data_position=position,
            grad_scaler=run.scaler,
            extra=extra,
            extra_files=files,
            config=run.config.as_dict(),
        )
        prune_checkpoints(output_dir, run.config.checkpoints_total_limit)
    barrier(run.dist)
