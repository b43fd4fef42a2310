"""Timed preference-training steps on an SD1.5-architecture UNet with random weights.

    python benchmarks/train_step.py --steps 10 --mixed_precision bf16 --batch_size 1
    python benchmarks/train_step.py --attention xformers --reference copy
    python benchmarks/train_step.py --write_pipeline /tmp/sd15-random   # then:
    fastpref-train --pretrained_model_name_or_path /tmp/sd15-random --resolution 512 \
        --mixed_precision bf16 --max_train_steps 1

Each step is the trainer's step (fastpref.training.step.preference_loss, backward, AdamW) on
random 512 px latents ([2B, 4, 64, 64]) and random [B, 77, 768] text embeddings.
"""

import argparse
import time

import torch

from fastpref.tiny.sd15 import sd15_scheduler, sd15_unet, write_sd15_pipeline
from fastpref.training.losses import LOSS_TYPES, get_loss_type
from fastpref.training.models import add_lora, frozen_copy, set_attention
from fastpref.training.step import preference_loss

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None) -> dict:
    """Run ``--steps`` timed steps after ``--warmup`` untimed ones; prints and returns timings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=1, help="preference pairs per step")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mixed_precision", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers"))
    p.add_argument("--reference", default="lora", choices=("lora", "copy"))
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--loss_type", default="dpo", choices=tuple(LOSS_TYPES))
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--write_pipeline", default=None, help="write a random SD1.5 pipeline here and exit")
    args = p.parse_args(argv)
    if args.write_pipeline:
        print(f"wrote {write_sd15_pipeline(args.write_pipeline)}")
        return {}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.mixed_precision]
    torch.manual_seed(0)
    unet = sd15_unet().to(device)
    set_attention(unet, args.attention == "xformers")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.reference == "lora":
        params, ref_unet = add_lora(unet, args.rank, dtype), unet
    else:
        params, ref_unet = list(unet.parameters()), frozen_copy(unet, dtype)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler, loss_type = sd15_scheduler(), get_loss_type(args.loss_type)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.mixed_precision != "no")

    def policy(x, t, e):
        with autocast:
            return unet(x, t, e).sample

    def reference(x, t, e):
        with autocast:
            if args.reference == "copy":
                return ref_unet(x, t, e).sample
            unet.disable_adapters()
            try:
                return unet(x, t, e).sample
            finally:
                unet.enable_adapters()

    B, h = args.batch_size, args.resolution // 8
    latents = torch.randn(2 * B, 4, h, h, device=device)
    embeddings = torch.randn(B, 77, 768, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        noise = torch.randn(B, 4, h, h, device=device)
        t = torch.randint(0, 1000, (B,), device=device)
        sync()
        start = time.perf_counter()
        loss, _ = preference_loss(policy, reference, scheduler, loss_type, None, latents, embeddings, noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"ms_per_step": 1000 * sum(times) / len(times), "loss": float(loss),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    print(f"{vars(args)}\n{result}")
    return result


if __name__ == "__main__":
    main()
