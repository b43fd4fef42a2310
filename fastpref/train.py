"""Preference alignment of a diffusion model with fastpref's fused losses.

    fastpref-train                                  # DPO on the bundled tiny model and data
    fastpref-train --loss_type sspo --cuda_graph    # any --loss_type; one CUDA graph per step
    torchrun --nproc_per_node 2 -m fastpref.train --loss_type dspo --reference copy ...

From Python: ``train(build(parse_config(loss_type="kto", max_train_steps=10)))``. ``build``
(``fastpref.training.run``) turns one read-only ``Config`` (the parsed flags) into a ``Run``:
every check (``fastpref.training.validation``), the model family's components
(``fastpref.training.family``, chosen by the pipeline's ``model_index.json``), the optimizer, a
resumed checkpoint and the step. ``train``, here, is the loop: batches -> step -> LR schedule ->
log -> checkpoint (``fastpref.training.output``), then the final weights. The loop knows no
model: the family does.

Rows 0..B-1 of a paired micro-batch are winners, B..2B-1 losers, and a pair shares its noise,
timestep and prompt (``fastpref.training.batches`` has the layouts, KTO's unpaired one
included). Every random draw of a stream item comes from a generator seeded by the item's
position in the data stream, so a run is independent of the process count and resumes
exactly. The step (``fastpref.training.step``: the forward, loss and backward of a micro-batch,
then clipping and the optimizer) makes no host synchronisation: metrics are read at logging
steps only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from fastpref.training.args import build_parser
from fastpref.training.config import parse_config
from fastpref.training.distributed import barrier, cleanup, read_metrics
from fastpref.training.exits import EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_STOPPED
from fastpref.training.finite import NonFiniteError, check_finite
from fastpref.training.output import start_output, write_checkpoint
from fastpref.training.run import Run, build
from fastpref.training.stopping import StopRequest

SHOWN_METRICS = ("loss", "implicit_acc", "acc", "margin_acc", "dpo_fraction")  # the progress bar's


def train(run: Run) -> Path:
    """Run the training loop of ``run`` to ``--max_train_steps`` (or a stop signal: then
    ``run.stopped`` is True and the CLI exits with ``EXIT_STOPPED``); returns the output directory.
    Only rank 0 writes."""
    config, dist = run.config, run.dist
    output_dir = Path(config.output_dir)
    logger = start_output(run, output_dir)
    step, position = run.start_step, run.start_position
    progress = tqdm(total=config.max_train_steps, initial=step, disable=not dist.is_main, desc="train")
    stopping, refreshed = False, None
    with StopRequest() as stop:
        while step < config.max_train_steps and not stopping:
            if run.online is not None and run.online.refresh_step(step) != refreshed:  # on-line pairs: a new set
                refreshed = run.online.refresh_step(step)
                run.source.pairs, values = run.online.pairs_at(step)
                if dist.is_main and values:
                    logger.log(step, values)
            replayed_step = None
            if run.replay is not None:  # SSPO: this step's reference weights
                index = run.replay.pick(step)
                run.replay.load(index)
                replayed_step = run.replay.steps[index]
            batches = [
                run.batch(position + (micro * dist.world_size + dist.rank) * run.per_process)
                for micro in range(config.gradient_accumulation_steps)
            ]
            metrics = run.step(batches)
            position += run.per_process * config.gradient_accumulation_steps * dist.world_size
            run.lr_scheduler.step()
            step += 1
            if run.replay is not None:
                run.replay.after_step(run.family.denoiser, step)
            progress.update(1)

            logging_step = step % config.logging_steps == 0 or step == config.max_train_steps
            if logging_step:
                values = read_metrics(metrics, dist)
                check_finite(step, values, run.params, where="logging it")
                values["lr"] = float(run.optimizer.param_groups[0]["lr"])  # host-ok: logging step
                if replayed_step is not None:
                    values["replayed_step"] = replayed_step
                if dist.is_main:
                    logger.log(step, values)
                    progress.set_postfix({k: f"{values[k]:.4f}" for k in SHOWN_METRICS if k in values})
            stopping = stop.agreed(dist, logging_step)
            if step % config.checkpointing_steps == 0 or stopping:
                check_finite(step, None, run.params, where=f"writing checkpoint-{step}")
                write_checkpoint(run, logger, output_dir, step, position)
    progress.close()
    run.stopped = stopping

    check_finite(step, None, run.params, where="saving the final weights")
    if run.sharded is not None and not stopping:  # every process gathers, rank 0 writes
        run.sharded.save_weights(run.family, output_dir)
    if dist.is_main:
        if stopping:
            print(
                f"fastpref-train: stopped by a signal after step {step}; wrote {output_dir}/checkpoint-{step}, "
                f"continue with --resume_from_checkpoint latest (the command line exits with status "
                f"{EXIT_STOPPED}, EX_TEMPFAIL)",
                file=sys.stderr,
            )
        elif run.sharded is None:
            run.family.save_weights(config.reference, output_dir)
        logger.close()
    barrier(dist)
    cleanup(dist, run.model)
    if run.sharded is not None:
        run.sharded.close()
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """Train from command-line flags (None: ``sys.argv[1:]``); returns the output directory, also
    after a stop by signal (``cli`` turns that into its exit status). Bad input raises ValueError
    before any write."""
    return train(build(parse_config(argv)))


def cli() -> None:
    """Console entry point (``fastpref-train``, ``python -m fastpref.train``). Exit status
    (``fastpref.training.exits``): 0 finished, 2 bad input (one error line), 3 non-finite loss or
    weights, 75 stopped by SIGTERM/SIGINT after writing a checkpoint."""
    try:
        config = parse_config(None)  # sys.argv; --help and flag errors end here, before the model loads
        run = build(config)
        train(run)
    except ValueError as error:
        build_parser().exit(EXIT_BAD_INPUT, f"fastpref-train: error: {error}\n")
    except NonFiniteError as error:
        build_parser().exit(EXIT_NON_FINITE, f"fastpref-train: error: {error}\n")
    if run.stopped:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    cli()
