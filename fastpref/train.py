"""Preference alignment of a Stable-Diffusion-layout model with fastpref's fused losses.

    fastpref-train                                  # DPO on the bundled tiny model and data
    fastpref-train --loss_type sspo --cuda_graph    # any --loss_type; one CUDA graph per step
    torchrun --nproc_per_node 2 -m fastpref.train --loss_type dspo --reference copy ...

Rows 0..B-1 of a paired micro-batch are winners, B..2B-1 losers, and a pair shares its noise,
timestep and prompt (``fastpref.training.batches`` has the layouts, KTO's unpaired one
included). Every random draw of a stream item comes from a generator seeded by the item's
position in the data stream, so a run is independent of the process count and resumes
exactly. The step (``fastpref.training.step``) makes no host synchronisation: metrics are
read at logging steps only.
"""

import json
import os
import sys
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastpref.training.args import build_parser, parse_args
from fastpref.training.batches import LAYOUTS, Encoders
from fastpref.training.checkpoint import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from fastpref.training.data import PreferencePairs, parquet_files
from fastpref.training.distributed import (barrier, cleanup, init_distributed, kto_global_baseline,
                                           read_metrics)
from fastpref.training.finite import EXIT_NON_FINITE, NonFiniteError, check_finite
from fastpref.training.graph import StaticStep, graph_refusal, make_optimizer
from fastpref.training.logging import MetricsLogger
from fastpref.training.losses import get_loss_type
from fastpref.training.models import (add_lora, check_pipeline_dir, frozen_copy, load_components,
                                      load_trainable_state, save_final_weights, set_attention,
                                      trainable_state, vae_sample_size)
from fastpref.training.replay import REPLAY_FILE, CheckpointReplay, self_sampler
from fastpref.training.step import TrainStep, preference_loss
from fastpref.training.stopping import EXIT_STOPPED, StopRequest, last_run_stopped

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def validate(args):
    """Every check that needs files, before anything is written: returns (loss_type, pairs,
    resolution, resume checkpoint or None)."""
    loss_type = get_loss_type(args.loss_type)
    if args.train_batch_size < loss_type.min_pairs:
        raise ValueError(f"--train_batch_size: --loss_type {args.loss_type} needs at least "
                         f"{loss_type.min_pairs} pairs per process, got {args.train_batch_size}")
    vae_factor = check_pipeline_dir(args.pretrained_model_name_or_path)
    args.resolution = args.resolution or vae_sample_size(args.pretrained_model_name_or_path)
    if args.resolution % vae_factor:
        raise ValueError(f"--resolution: expected a multiple of the VAE downsampling factor "
                         f"{vae_factor}, got {args.resolution}")
    pairs = PreferencePairs(parquet_files(args.data_path, args.data_argument), args.data_argument)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.cuda_graph:
        refusal = graph_refusal(cuda_available=torch.cuda.is_available(),
                                gradient_checkpointing=args.gradient_checkpointing,
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if refusal:
            raise ValueError(refusal)
    return loss_type, pairs, resume


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output directory. Bad input raises ValueError before any write."""
    args = parse_args(argv)
    loss_type, pairs, resume = validate(args)
    dist = init_distributed()
    device, weight_dtype = dist.device, DTYPES[args.mixed_precision]
    torch.manual_seed(args.seed)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(
        args.pretrained_model_name_or_path, device, weight_dtype)
    set_attention(unet, True if args.enable_xformers_memory_efficient_attention else None)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = add_lora(unet, args.rank, weight_dtype) if args.reference == "lora" else list(unet.parameters())
    replay = None
    if loss_type.data == "winners":  # SSPO: the replayed checkpoint is the reference
        reference_unet = frozen_copy(unet, weight_dtype)
        replay = CheckpointReplay(unet, reference_unet, snapshot_steps=args.sspo_snapshot_steps,
                                  num_snapshots=args.sspo_num_snapshots, seed=args.seed)
    elif args.reference == "copy" and loss_type.needs_reference:
        reference_unet = frozen_copy(unet, weight_dtype)
    else:
        reference_unet = None  # LoRA: the reference is the UNet with its adapters disabled
    unet.train()

    per_process = args.train_batch_size * (2 if loss_type.data == "images" else 1)  # stream items
    per_step = per_process * args.gradient_accumulation_steps * dist.world_size
    lr = args.learning_rate * (args.train_batch_size * args.gradient_accumulation_steps * dist.world_size
                               if args.scale_lr else 1)
    optimizer = make_optimizer(params, lr, static=args.cuda_graph, betas=(args.adam_beta1, args.adam_beta2),
                               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" and device.type == "cuda" else None

    step, position = 0, 0
    if resume is not None:
        tensors, state = load_checkpoint(resume, optimizer, lr_scheduler, scaler)
        load_trainable_state(unet, args.reference, tensors)
        step, position = state["step"], state["data_position"]
        if replay is not None:
            if "sspo_pool_steps" not in state["extra"]:
                raise ValueError(f"--resume_from_checkpoint: {str(resume)!r} holds no SSPO replay pool "
                                 f"(written by another --loss_type); start --loss_type sspo afresh")
            replay.restore(resume, state["extra"]["sspo_pool_steps"])
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else unet

    # a graph-captured step must not reuse autocast's weight-cast cache across capture
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no",
                              cache_enabled=not args.cuda_graph)

    def policy(x, t, e):
        with autocast:
            return model(x, t, e).sample

    def reference(x, t, e):
        with autocast:
            if reference_unet is not None:
                return reference_unet(x, t, e).sample
            unet.disable_adapters()
            try:
                return unet(x, t, e).sample
            finally:
                unet.enable_adapters()

    encoders = Encoders(vae, tokenizer, text_encoder, noise_scheduler.config.num_train_timesteps, device,
                        weight_dtype, args.resolution, args.random_crop, not args.no_hflip, args.seed)
    build = LAYOUTS[loss_type.data]
    sampler = () if replay is None else (self_sampler(reference, encoders, noise_scheduler.config,
                                                      num_steps=args.sspo_sample_steps,
                                                      guidance_scale=args.sspo_guidance_scale),)
    kl_baseline = kto_global_baseline(dist)
    train_step = TrainStep(
        lambda batch: preference_loss(policy, reference, noise_scheduler, loss_type, batch, beta=args.beta,
                                      rpo_tau=args.rpo_tau, kl_baseline=kl_baseline),
        params, optimizer, max_grad_norm=args.max_grad_norm, scaler=scaler,
        no_sync=model.no_sync if dist.enabled else None)
    run_step = StaticStep(train_step, use_graph=True, capture_optimizer=scaler is None) \
        if args.cuda_graph else train_step

    output_dir = Path(args.output_dir)
    logger = None
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        logger = MetricsLogger(output_dir, args.report_to, resume_step=step)
    barrier(dist)

    progress = tqdm(total=args.max_train_steps, initial=step, disable=not dist.is_main, desc="train")
    stopping = False
    with StopRequest() as stop:
        while step < args.max_train_steps and not stopping:
            replayed_step = None
            if replay is not None:
                index = replay.pick(step)
                replay.load(index)
                replayed_step = replay.steps[index]
            batches = []
            for micro in range(args.gradient_accumulation_steps):
                start = position + (micro * dist.world_size + dist.rank) * per_process
                batches.append(build(pairs, list(range(start, start + per_process)), encoders, *sampler))
            metrics = run_step(batches)
            position += per_step
            lr_scheduler.step()
            step += 1
            if replay is not None:
                replay.after_step(unet, step)
            progress.update(1)

            logging_step = step % args.logging_steps == 0 or step == args.max_train_steps
            if logging_step:
                values = read_metrics(metrics, dist)
                check_finite(step, values, params, where="logging it")
                values["lr"] = float(optimizer.param_groups[0]["lr"])  # host-ok: logging step
                if replayed_step is not None:
                    values["replayed_step"] = replayed_step
                if dist.is_main:
                    logger.log(step, values)
                    shown = {key: values[key] for key in ("loss", "implicit_acc", "acc", "margin_acc", "dpo_fraction")
                             if key in values}
                    progress.set_postfix({key: f"{value:.4f}" for key, value in shown.items()})
            stopping = stop.agreed(dist, logging_step)
            if step % args.checkpointing_steps == 0 or stopping:
                check_finite(step, None, params, where=f"writing checkpoint-{step}")
                if dist.is_main:
                    logger.flush()
                    extra, files = {}, {}
                    if replay is not None:
                        files[REPLAY_FILE], extra["sspo_pool_steps"] = replay.state()
                    save_checkpoint(output_dir, step, trainable=trainable_state(unet, args.reference),
                                    optimizer=optimizer, lr_scheduler=lr_scheduler, data_position=position,
                                    grad_scaler=scaler, extra=extra, extra_files=files)
                    prune_checkpoints(output_dir, args.checkpoints_total_limit)
                barrier(dist)
    progress.close()

    check_finite(step, None, params, where="saving the final weights")
    if dist.is_main:
        if stopping:
            print(f"fastpref-train: stopped by a signal after step {step}; wrote {output_dir}/checkpoint-{step}, "
                  f"continue with --resume_from_checkpoint latest", file=sys.stderr)
        else:
            save_final_weights(unet, args.reference, output_dir)
        logger.close()
    barrier(dist)
    cleanup(dist, model)
    return output_dir


def cli() -> None:
    """Console entry point: bad input prints one error line and exits with status 2."""
    try:
        main()
        if last_run_stopped():
            sys.exit(EXIT_STOPPED)
    except ValueError as error:
        build_parser().exit(2, f"fastpref-train: error: {error}\n")
    except NonFiniteError as error:
        build_parser().exit(EXIT_NON_FINITE, f"fastpref-train: error: {error}\n")


if __name__ == "__main__":
    cli()
