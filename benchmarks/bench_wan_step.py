"""One real-size Diffusion-DPO step of a Wan2.1-T2V-1.3B-config transformer at random init.

    python benchmarks/bench_wan_step.py                      # GPU: 480x832, 33 frames (else 17, 9), bf16, LoRA r8
    python benchmarks/bench_wan_step.py --tiny --device cpu  # smoke: the tiny Wan transformer config

The step is the trainer's (``fastpref.training.step``: ``preference_loss`` + ``TrainStep``) on a
``WanTransformer3DModel`` built from the Wan2.1-T2V-1.3B config (written inline; nothing is
downloaded): bf16 weights, LoRA rank 8 on to_q/to_k/to_v/to_out.0 (alpha = rank, gaussian
init, float32 adapters), AdamW, grad-norm clip 1.0, autocast bf16, Diffusion-DPO (β 5000) with
the reference forward = adapters disabled, flow matching with ``WanFamily``'s own methods
(``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``, logit-normal σ on Wan2.1's shift-3 schedule)
with σ shared by a pair. One pair per step: latents ``[2, 16, F', 60, 104]`` (480 x
832 px, VAE factor 8; ``F' = 1 + (F - 1) / 4``), random UMT5-width text states ``[2, 512, 4096]``.
The VAE and the text encoder are not run (their cost is outside the step the trainer repeats).

Figures (one CSV row per frame count that fits): frames, latent shape, steps/s over the timed
steps after warm-up (CUDA events), peak memory (``max_memory_allocated`` over the timed steps),
LoRA parameters. The first frame count of ``--frames`` that does not run out of memory wins;
smaller ones are tried after an out-of-memory error.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN21_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
TINY = dict(
    WAN21_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2
)


def flow_family(shift: float = 3.0):
    """The flow-matching half of ``WanFamily`` the step needs (``add_noise``, ``error_weight``,
    ``draw_timestep``), with Wan2.1-T2V's schedule (``T`` 1000, shift 3.0) and no model loaded."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastpref.training.families.wan import WanFamily

    family = object.__new__(WanFamily)  # the flow methods read only the scheduler and the class defaults
    family.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return family


def run(frames: int, args, device: torch.device) -> dict:
    from diffusers import WanTransformer3DModel

    from fastpref.training.batches import Batch
    from fastpref.training.families.wan import LORA_TARGET_MODULES
    from fastpref.training.losses import get_loss_type
    from fastpref.training.models import add_lora
    from fastpref.training.step import TrainStep, preference_loss

    torch.manual_seed(0)
    config = TINY if args.tiny else WAN21_1_3B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = WanTransformer3DModel(**config).to(device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = add_lora(model, args.rank, dtype, LORA_TARGET_MODULES)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    height, width = (32, 32) if args.tiny else (args.height, args.width)
    factor = 4 if args.tiny else 8
    shape = (2, config["in_channels"], 1 + (frames - 1) // 4, height // factor, width // factor)
    text = (2, 16 if args.tiny else 512, config["text_dim"])
    g = torch.Generator(device="cpu").manual_seed(1)
    flow = flow_family()
    t = flow.draw_timestep(g).repeat(2)  # a pair shares its timestep
    batch = Batch(
        latents=torch.randn(shape, generator=g).to(device),
        embeddings=torch.randn(text, generator=g).to(device, dtype),
        pooled=torch.randn(2, config["text_dim"], generator=g).to(device, dtype),
        noise=torch.randn(shape, generator=g).to(device),
        timesteps=t.to(device),
        labels=torch.tensor([1.0, 0.0], device=device),
    )
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")

    def forward(noisy, timesteps, emb, pooled, extra=None):
        with autocast:
            return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=emb, return_dict=False)[0]

    def reference(noisy, timesteps, emb, pooled, extra=None):
        model.disable_adapters()
        try:
            return forward(noisy, timesteps, emb, pooled)
        finally:
            model.enable_adapters()

    loss_type = get_loss_type("dpo")
    step = TrainStep(
        lambda b: preference_loss(forward, reference, flow, loss_type, b), params, optimizer, max_grad_norm=1.0
    )
    for _ in range(args.warmup):
        step([batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        begin = time.perf_counter()
    for _ in range(args.steps):
        metrics = step([batch])
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        seconds, peak = time.perf_counter() - begin, float("nan")
    loss = float(metrics["loss"])  # host-ok: benchmark, after the timed steps
    return {
        "config": "tiny" if args.tiny else "wan2.1-t2v-1.3b",
        "frames": frames,
        "latents": "x".join(map(str, shape)),
        "dtype": str(dtype).removeprefix("torch."),
        "lora_rank": args.rank,
        "lora_params": sum(p.numel() for p in params),
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_per_s": args.steps / seconds,
        "s_per_step": seconds / args.steps,
        "peak_memory_gib": peak,
        "loss": loss,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frames", default="33,17,9", help="frame counts to try, largest first (each 1 + 4k)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke test)")
    p.add_argument("--out", default="benchmarks/results/wan_step.csv")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        try:
            rows.append(run(frames, args, device))
            break
        except torch.OutOfMemoryError as error:
            print(f"{frames} frames: out of memory ({str(error)[:120]}); trying fewer", file=sys.stderr)
            torch.cuda.empty_cache()
    if not rows:
        raise SystemExit("no frame count fits")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(", ".join(f"{k}={v}" for k, v in row.items()))
    return rows


if __name__ == "__main__":
    main()
