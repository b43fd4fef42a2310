"""Preference alignment of a Stable-Diffusion-layout model with fastpref's fused losses.

    fastpref-train                                  # DPO on the bundled tiny model and data
    torchrun --nproc_per_node 2 -m fastpref.train --loss_type dspo --reference copy ...

Every pair (winner, loser) shares its VAE-latent noise, diffusion noise and timestep; rows
0..B-1 of a micro-batch are winners, B..2B-1 losers. All per-pair randomness (crop, flip,
latent sample, noise, timestep) is drawn from a generator seeded by the pair's position in
the data stream, so a run is independent of the process count and resumes exactly.
"""

import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastpref.training.args import build_parser, parse_args
from fastpref.training.checkpoint import load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from fastpref.training.data import PreferencePairs, pair_indices, pair_pixels, parquet_files
from fastpref.training.distributed import barrier, cleanup, init_distributed, mean_across_ranks
from fastpref.training.logging import MetricsLogger
from fastpref.training.losses import get_loss_type
from fastpref.training.models import (add_lora, check_pipeline_dir, frozen_copy, load_components,
                                      load_trainable_state, save_final_weights, set_attention,
                                      trainable_state, vae_sample_size)
from fastpref.training.step import encode_prompts, preference_loss

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
    if args.enable_xformers_memory_efficient_attention:
        import importlib.util
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                             "(pip install xformers); drop the flag to use PyTorch SDPA attention")
    return loss_type, pairs, resume


def pair_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the pair at global stream ``position``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def micro_batch(pairs, positions, args, vae, tokenizer, text_encoder, num_timesteps, device, weight_dtype):
    """Latents ``[2B, C, h, w]`` (winners first), text embeddings ``[B, L, D]``, noise
    ``[B, C, h, w]`` and timesteps ``[B]`` for the pairs at stream ``positions``."""
    indices = pair_indices(positions[0], len(positions), len(pairs), args.seed)
    generators = [pair_generator(args.seed, p) for p in positions]
    winners, losers, captions = [], [], []
    for index, g in zip(indices, generators):
        caption, winner, loser = pairs[index]
        w, l = pair_pixels(winner, loser, args.resolution, random_crop=args.random_crop,
                           hflip=not args.no_hflip, generator=g)
        winners.append(w)
        losers.append(l)
        captions.append(caption)
    pixels = torch.stack(winners + losers).to(device, dtype=weight_dtype)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    shape = dist.mean.shape[1:]
    draws = [(torch.randn((2, *shape), generator=g), torch.randn(shape, generator=g),
              torch.randint(0, num_timesteps, (), generator=g)) for g in generators]
    latent_eps = torch.cat([torch.stack([d[0][0] for d in draws]), torch.stack([d[0][1] for d in draws])])
    latents = dist.mean.float() + dist.std.float() * latent_eps.to(device)
    latents = latents * vae.config.scaling_factor
    noise = torch.stack([d[1] for d in draws]).to(device)
    timesteps = torch.stack([d[2] for d in draws]).to(device)
    embeddings = encode_prompts(tokenizer, text_encoder, captions, device)
    return latents, embeddings, noise, timesteps


def main(argv: list[str] | None = None) -> Path:
    """Train; returns the output directory. Bad input raises ValueError before any write."""
    args = parse_args(argv)
    loss_type, pairs, resume = validate(args)
    dist = init_distributed()
    device, weight_dtype = dist.device, DTYPES[args.mixed_precision]
    torch.manual_seed(args.seed)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(
        args.pretrained_model_name_or_path, device, weight_dtype)
    set_attention(unet, args.enable_xformers_memory_efficient_attention)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.reference == "lora":
        params = add_lora(unet, args.rank, weight_dtype)
        reference_unet = unet
    else:
        params = list(unet.parameters())
        reference_unet = frozen_copy(unet, weight_dtype) if loss_type.needs_reference else None
    unet.train()

    per_step = args.train_batch_size * args.gradient_accumulation_steps * dist.world_size
    lr = args.learning_rate * (per_step if args.scale_lr else 1)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" and device.type == "cuda" else None

    step, position = 0, 0
    if resume is not None:
        tensors, state = load_checkpoint(resume, optimizer, lr_scheduler, scaler)
        load_trainable_state(unet, args.reference, tensors)
        step, position = state["step"], state["data_position"]
    model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else unet

    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no")

    def policy(x, t, e):
        with autocast:
            return model(x, t, e).sample

    def reference(x, t, e):
        with autocast:
            if args.reference == "copy":
                return reference_unet(x, t, e).sample
            unet.disable_adapters()
            try:
                return unet(x, t, e).sample
            finally:
                unet.enable_adapters()

    output_dir = Path(args.output_dir)
    logger = None
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        logger = MetricsLogger(output_dir, args.report_to, resume_step=step)
    barrier(dist)

    progress = tqdm(total=args.max_train_steps, initial=step, disable=not dist.is_main, desc="train")
    while step < args.max_train_steps:
        totals = defaultdict(float)
        for micro in range(args.gradient_accumulation_steps):
            start = position + (micro * dist.world_size + dist.rank) * args.train_batch_size
            batch = micro_batch(pairs, list(range(start, start + args.train_batch_size)), args, vae,
                                tokenizer, text_encoder, noise_scheduler.config.num_train_timesteps,
                                device, weight_dtype)
            sync = nullcontext() if not dist.enabled or micro == args.gradient_accumulation_steps - 1 \
                else model.no_sync()
            with sync:
                loss, metrics = preference_loss(policy, reference, noise_scheduler, loss_type,
                                                args.beta, *batch)
                scaled = loss / args.gradient_accumulation_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
            for key, value in metrics.items():
                if value.numel() == 1 and value.is_floating_point():
                    totals[key] += value.item() / args.gradient_accumulation_steps
        position += per_step
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        values = mean_across_ranks(dict(totals), dist)
        values.update(grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0])
        progress.update(1)
        if dist.is_main:
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                logger.log(step, values)
            progress.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                 acc=f"{values.get('implicit_acc', float('nan')):.2f}")
            if step % args.checkpointing_steps == 0:
                logger.flush()
                save_checkpoint(output_dir, step, trainable=trainable_state(unet, args.reference),
                                optimizer=optimizer, lr_scheduler=lr_scheduler,
                                data_position=position, grad_scaler=scaler)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
        barrier(dist)
    progress.close()

    if dist.is_main:
        save_final_weights(unet, args.reference, output_dir)
        logger.close()
    barrier(dist)
    cleanup(dist)
    return output_dir


def cli() -> None:
    """Console entry point: bad input prints one error line and exits with status 2."""
    try:
        main()
    except ValueError as error:
        build_parser().exit(2, f"fastpref-train: error: {error}\n")


if __name__ == "__main__":
    cli()
