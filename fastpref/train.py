"""Preference alignment of a diffusion model with fastpref's fused losses.

    fastpref-train                                  # DPO on the bundled tiny model and data
    fastpref-train --loss_type sspo --cuda_graph    # any --loss_type; one CUDA graph per step
    torchrun --nproc_per_node 2 -m fastpref.train --loss_type dspo --reference copy ...

From Python: ``train(build(parse_config(loss_type="kto", max_train_steps=10)))``. ``build``
turns one read-only ``Config`` (the parsed flags) into a ``Run``: every check, the model family's
components (``fastpref.training.family``, chosen by the pipeline's ``model_index.json``), the
optimizer, a resumed checkpoint and the step. ``train`` is the loop: batches -> step -> LR
schedule -> log -> checkpoint, then the final weights. The loop knows no model: the family does.

Rows 0..B-1 of a paired micro-batch are winners, B..2B-1 losers, and a pair shares its noise,
timestep and prompt (``fastpref.training.batches`` has the layouts, KTO's unpaired one
included). Every random draw of a stream item comes from a generator seeded by the item's
position in the data stream, so a run is independent of the process count and resumes
exactly. The step (``fastpref.training.step``: the forward, loss and backward of a micro-batch,
then clipping and the optimizer) makes no host synchronisation: metrics are read at logging
steps only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastpref.training.args import build_parser
from fastpref.training.batches import LAYOUTS, Batch, Encoders
from fastpref.training.checkpoint import (
    check_resume_config,
    load_checkpoint,
    prune_checkpoints,
    record_resume,
    remove_orphans,
    resolve_resume,
    save_checkpoint,
)
from fastpref.training.config import Config, parse_config
from fastpref.training.data import PreferencePairs, log_skipped_rows
from fastpref.training.distributed import (
    DistState,
    barrier,
    cleanup,
    init_distributed,
    kto_global_baseline,
    read_metrics,
)
from fastpref.training.exits import EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_STOPPED
from fastpref.training.family import ModelFamily, family_class, load_family
from fastpref.training.finite import NonFiniteError, check_finite
from fastpref.training.fsdp import ShardedRun, check_sharded_resume, fsdp_refusal
from fastpref.training.graph import StaticStep, graph_refusal, make_optimizer
from fastpref.training.latent_cache import cached_encoders, check_cache_flags
from fastpref.training.logging import MetricsLogger
from fastpref.training.losses import LossType, get_loss_type
from fastpref.training.models import frozen_copy, load_trainable_state, trainable_state
from fastpref.training.online import OnlinePairs, check_online
from fastpref.training.replay import REPLAY_FILE, CheckpointReplay, self_sampler
from fastpref.training.sources import preference_sources
from fastpref.training.speed import SpeedStep, check_speed, prepare_denoiser, set_backends, wants_wrapper
from fastpref.training.step import TrainStep, preference_loss
from fastpref.training.stopping import StopRequest

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHOWN_METRICS = ("loss", "implicit_acc", "acc", "margin_acc", "dpo_fraction")  # the progress bar's


@dataclass
class PairsSource:
    """The preference pairs in force: the data set, or the latest on-line set."""

    pairs: PreferencePairs


@dataclass
class Run:
    """A training run as ``build`` makes it and ``train`` runs it."""

    config: Config
    dist: DistState
    family: ModelFamily  # the model: frozen encoders, schedule, trainable ``family.denoiser``
    loss_type: LossType
    batch: Callable[[int], Batch]  # stream position -> this process's micro-batch starting there
    per_process: int  # stream items of one micro-batch of one process
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler | None
    train_step: TrainStep  # the eager step
    step: Callable[[list[Batch]], dict[str, torch.Tensor]]  # what the loop calls: train_step or its StaticStep
    replay: CheckpointReplay | None  # SSPO's snapshot pool, whose replay model is the reference
    encoders: Encoders
    model: torch.nn.Module  # what the policy forward calls: the denoiser, DDP-wrapped under torchrun
    start_step: int = 0  # optimizer steps already taken (a resumed checkpoint's)
    start_position: int = 0  # stream position of the next micro-batch
    skipped_rows: tuple = ()  # --skip_bad_rows: the dropped rows (PreferencePairs.skipped)
    resumed: tuple[Path, dict] | None = None  # a resume: (checkpoint, the safe flags it changed)
    stopped: bool = False  # set by ``train``: a stop signal ended it before --max_train_steps
    online: OnlinePairs | None = None  # --online_pairs_every: the refreshes of the preference set
    source: PairsSource | None = None  # the pairs ``batch`` reads (replaced at each on-line refresh)
    sharded: ShardedRun | None = None  # --fsdp: the FSDP2 shards, sharded checkpoints and the final gather


def validate(config: Config) -> tuple[Config, LossType, PreferencePairs, Path | None]:
    """Every check that needs files, before anything is written: returns (config with the
    resolution filled in, loss type, pairs, resume checkpoint or None)."""
    loss_type = get_loss_type(config.loss_type)
    if config.train_batch_size < loss_type.min_pairs:
        raise ValueError(
            f"--train_batch_size: --loss_type {config.loss_type} needs at least "
            f"{loss_type.min_pairs} pairs per process, got {config.train_batch_size}"
        )
    family = family_class(config.pretrained_model_name_or_path)
    factor = family.check(config.pretrained_model_name_or_path)
    family.check_flags(config)
    pairs = None
    if family.media == "videos":  # video pairs: the clip length and the default size come from the data
        from fastpref.training.video_data import read_video_pairs

        if config.online_pairs_every is not None:
            raise ValueError(
                f"--online_pairs_every: on-line pairs are made for image families; {family.__name__} trains on "
                f"videos: make the set with fastpref-pairs (it writes a video index) and pass it as --dataset_name"
            )

        pairs, config = read_video_pairs(config, family)
    resolution = config.resolution or family.default_resolution(config.pretrained_model_name_or_path)
    config = config.replace(resolution=resolution)
    if config.resolution % factor:
        raise ValueError(
            f"--resolution: expected a multiple of the VAE downsampling factor {factor}, got {config.resolution}"
        )
    family.check_resolution(config.pretrained_model_name_or_path, config.resolution)
    if pairs is None:
        sources = preference_sources(
            config.data_path, config.data_argument, split=config.dataset_split, streaming=config.dataset_streaming
        )
        pairs = PreferencePairs(sources, config.data_argument, skip_bad_rows=config.skip_bad_rows)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    refusal = fsdp_refusal(config, os.environ)
    if refusal:
        raise ValueError(refusal)
    if config.cuda_graph:
        refusal = graph_refusal(
            cuda_available=torch.cuda.is_available(),
            gradient_checkpointing=config.gradient_checkpointing,
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )
        if refusal:
            raise ValueError(refusal)
    check_speed(config)
    check_cache_flags(config, family)
    return config, loss_type, pairs, resume


def optimizer_and_schedule(config: Config, params: list[torch.nn.Parameter], world_size: int = 1):
    """AdamW over ``params`` (``--cuda_graph``: the tensor-LR one a captured step needs) and its
    ``--lr_scheduler``; ``--scale_lr`` multiplies the LR by the global batch."""
    from diffusers.optimization import get_scheduler  # here: ``fastpref-train --help`` imports no diffusers

    lr = config.learning_rate * (
        config.train_batch_size * config.gradient_accumulation_steps * world_size if config.scale_lr else 1
    )
    optimizer = make_optimizer(
        params,
        lr,
        static=config.cuda_graph,
        fused=config.use_fused_adam,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    return optimizer, lr_scheduler


def make_step(
    config: Config,
    loss_fn: Callable,
    params: list[torch.nn.Parameter],
    optimizer,
    *,
    scaler=None,
    no_sync: Callable | None = None,
) -> tuple[TrainStep, Callable]:
    """``(train_step, step)``: the eager ``TrainStep`` of ``loss_fn(batch) -> (loss, metrics)``
    and what the loop calls, the same step captured in a CUDA graph under ``--cuda_graph``."""
    train_step = TrainStep(
        loss_fn, params, optimizer, max_grad_norm=config.max_grad_norm, scaler=scaler, no_sync=no_sync
    )
    step = StaticStep(train_step, use_graph=True, capture_optimizer=scaler is None) if config.cuda_graph else train_step
    if wants_wrapper(config):  # --sdpa_backend, --compile_denoiser (fastpref.training.speed)
        step = SpeedStep(step, config)
    return train_step, step


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """LoRA's reference: ``model`` with its adapters off for the duration."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def build(config: Config) -> Run:
    """The run of ``config``, ready to ``train``. Bad input raises ValueError before any write."""
    config, loss_type, pairs, resume = validate(config)
    online_prompts = check_online(config, pairs)
    if resume is None:
        resumed = None
    elif config.fsdp:  # may resume on another number of processes, same global batch
        resumed = (resume, check_sharded_resume(resume, config, int(os.environ["WORLD_SIZE"])))
    else:
        resumed = (resume, check_resume_config(resume, config.as_dict()))
    dist = init_distributed()
    weight_dtype = DTYPES[config.mixed_precision]
    torch.manual_seed(config.seed)
    set_backends(config)  # --allow_tf32

    family = load_family(config.pretrained_model_name_or_path, dist.device, weight_dtype)
    family.configure(config)  # its family-specific flags (flow matching: the timestep density)
    family.set_attention(True if config.enable_xformers_memory_efficient_attention else None)
    denoiser = family.denoiser
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    params = family.add_lora(config.rank) if config.reference == "lora" else list(denoiser.parameters())
    replay, reference_model = None, None  # LoRA: the reference is the denoiser with its adapters disabled
    if loss_type.data == "winners":  # SSPO: the replayed checkpoint is the reference
        reference_model = frozen_copy(denoiser, weight_dtype)
        replay = CheckpointReplay(
            denoiser,
            reference_model,
            snapshot_steps=config.sspo_snapshot_steps,
            num_snapshots=config.sspo_num_snapshots,
            seed=config.seed,
        )
    elif config.reference == "copy" and loss_type.needs_reference:
        reference_model = frozen_copy(denoiser, weight_dtype)
    denoiser.train()
    for module in (denoiser, reference_model):  # --fp8, --channels_last, --compile_denoiser
        if module is not None:
            prepare_denoiser(config, module)
    sharded = None
    if config.fsdp:  # shards denoiser and reference copy in place; the trainable parameters are DTensors now
        sharded = ShardedRun(denoiser, reference_model, config, dist)
        params = sharded.params

    optimizer, lr_scheduler = optimizer_and_schedule(config, params, dist.world_size)
    scaler = (
        torch.amp.GradScaler(dist.device.type)
        if config.mixed_precision == "fp16" and dist.device.type == "cuda"
        else None
    )
    start_step, start_position = 0, 0
    if resume is not None and sharded is not None:
        state = sharded.load_checkpoint(resume, optimizer, lr_scheduler)
        start_step, start_position = state["step"], state["data_position"]
    elif resume is not None:
        tensors, state = load_checkpoint(resume, optimizer, lr_scheduler, scaler)
        try:
            load_trainable_state(denoiser, config.reference, tensors)
        except (RuntimeError, ValueError, KeyError) as error:  # shapes or keys of another rank / model
            raise ValueError(
                f"--resume_from_checkpoint: {str(resume / 'trainable.safetensors')!r} does not fit "
                f"this model (another --rank or model?): {str(error)[:300]}"
            ) from error
        start_step, start_position = state["step"], state["data_position"]
        if replay is not None:
            if "sspo_pool_steps" not in state["extra"]:
                raise ValueError(
                    f"--resume_from_checkpoint: {str(resume)!r} holds no SSPO replay pool "
                    f"(written by another --loss_type); start --loss_type sspo afresh"
                )
            replay.restore(resume, state["extra"]["sspo_pool_steps"])
    model = (
        DistributedDataParallel(denoiser, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        if dist.enabled and sharded is None
        else denoiser
    )

    # a graph-captured step must not reuse autocast's weight-cast cache across capture
    autocast = torch.autocast(
        dist.device.type,
        dtype=weight_dtype,
        enabled=config.mixed_precision != "no",
        cache_enabled=not config.cuda_graph,
    )

    def policy(noisy, t, emb, pooled, extra=None):
        with autocast:
            return family.denoise(model, noisy, t, emb, pooled, extra)

    def reference(noisy, t, emb, pooled, extra=None):
        with autocast:
            if reference_model is not None:
                return family.denoise(reference_model, noisy, t, emb, pooled, extra)
            with adapters_disabled(denoiser):
                return family.denoise(denoiser, noisy, t, emb, pooled, extra)

    kl_baseline = kto_global_baseline(dist)

    def loss_fn(micro_batch: Batch):
        return preference_loss(
            policy,
            reference,
            family,
            loss_type,
            micro_batch,
            beta=config.beta,
            rpo_tau=config.rpo_tau,
            kl_baseline=kl_baseline,
        )

    no_sync = sharded.no_sync if sharded is not None else model.no_sync if dist.enabled else None
    train_step, step = make_step(config, loss_fn, params, optimizer, scaler=scaler, no_sync=no_sync)

    encoders = Encoders(family, config.resolution, config.random_crop, not config.no_hflip, config.seed)
    if config.cache_latents:  # the VAE and text encoder run once, here (fastpref.training.latent_cache)
        encoders, _ = cached_encoders(
            config, encoders, pairs, loss_type.data, is_main=dist.is_main, barrier=lambda: barrier(dist)
        )
    layout = LAYOUTS[loss_type.data]
    sampler = (
        ()
        if replay is None
        else (
            self_sampler(
                reference, family, num_steps=config.sspo_sample_steps, guidance_scale=config.sspo_guidance_scale
            ),
        )
    )
    per_process = config.train_batch_size * (2 if loss_type.data == "images" else 1)  # stream items

    source = PairsSource(pairs)

    def batch_at(start: int) -> Batch:
        return layout(source.pairs, list(range(start, start + per_process)), encoders, *sampler)

    online = None
    if online_prompts is not None:
        online = OnlinePairs(
            config, family, dist, online_prompts, barrier=lambda: barrier(dist), weight_dtype=weight_dtype
        )
        if resume is not None:
            online.check_resume(start_step)

    return Run(
        config,
        dist,
        family,
        loss_type,
        batch_at,
        per_process,
        params,
        optimizer,
        lr_scheduler,
        scaler,
        train_step,
        step,
        replay,
        encoders,
        model,
        start_step,
        start_position,
        tuple(pairs.skipped),
        resumed,
        online=online,
        source=source,
        sharded=sharded,
    )


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
