"""A training run: the ``Run`` that ``build(config)`` makes from one read-only ``Config`` (every
check, the model family's components, LoRA or the frozen reference copy, the optimizer and LR
schedule, a resumed checkpoint, the data stream and the step), ready for the loop,
``fastpref.train.train``. ``optimizer_and_schedule`` and ``make_step`` are the two builders the
step benchmarks share with the trainer."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fastpref.training.batches import LAYOUTS, Batch, Encoders
from fastpref.training.checkpoint import check_resume_config, load_checkpoint
from fastpref.training.config import Config
from fastpref.training.data import PreferencePairs
from fastpref.training.distributed import DistState, barrier, init_distributed, kto_global_baseline
from fastpref.training.family import ModelFamily, load_family
from fastpref.training.fsdp import ShardedRun, check_sharded_resume
from fastpref.training.graph import StaticStep, make_optimizer
from fastpref.training.latent_cache import cached_encoders
from fastpref.training.losses import LossType
from fastpref.training.models import adapters_disabled, frozen_copy, load_trainable_state
from fastpref.training.online import OnlinePairs, check_online
from fastpref.training.replay import CheckpointReplay, self_sampler
from fastpref.training.speed import SpeedStep, prepare_denoiser, set_backends, wants_wrapper
from fastpref.training.step import TrainStep, preference_loss
from fastpref.training.validation import validate

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
