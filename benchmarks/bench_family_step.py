"""One real-size Diffusion-DPO LoRA step per model family at random init: steps/s and peak memory.

    python benchmarks/bench_family_step.py                       # CUDA: SDXL 1024 px, SD3-medium and Flux 512 px
    python benchmarks/bench_family_step.py --families flux --steps 5
    python benchmarks/bench_family_step.py --tiny --device cpu --steps 1   # smoke (the CPU test)
    python benchmarks/bench_family_step.py --sweep --pairs 2 --steps 5    # CUDA: the flow-family speed sweep

``--sweep`` (``flow_providers.py``; SD3-medium and Flux): a flow_grpo-style step (four sequential
forwards, flow_grpo's eager loss) against fastpref's step with each trainer speed option that
applies to a transformer and all of them, one fresh model per provider; steps/s, pairs/s, the
ratio to ``flow_grpo``, peak memory, compile time and MFU (``bench_train_step``'s FLOP counter
and peak table, ``speed_providers.analytic_flops``). CSV (default
``benchmarks/results/family_sweep.csv``) and its ``.meta.json`` (command, device, notes).

The step is the trainer's for that family with cached conditioning: bf16 frozen denoiser, LoRA
rank 8 (float32, the families' target modules) on the attention projections, SDPA attention,
the policy forward over ``2B`` rows (winners then losers, a pair sharing noise and timestep),
the reference forward with the adapters disabled under ``no_grad``, ``fastpref.diffusion_dpo_loss``,
backward, grad-norm clip 1.0 and AdamW. The denoiser configurations are written inline (SDXL
base's UNet, SD3-medium's and FLUX.1-dev's transformers, as diffusers' conversion scripts build
them); text conditioning is random of the families' shapes, so no text encoder is built and
nothing is downloaded. Flow families noise as docs/methods.md §7 states; Flux's latents are
packed 2x2 by diffusers' own ``FluxPipeline._pack_latents``.

Figures: median step time over the timed steps after warm-up (CUDA events), steps/s, pairs/s,
``max_memory_allocated`` over the timed steps. Written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

import fastpref
from fastpref.training.models import add_lora

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# the same architectures scaled down for the CPU smoke test
TINY = {
    "sdxl": dict(
        SDXL_UNET,
        sample_size=8,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=32,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    ),
    "sd3": dict(
        SD3_MEDIUM,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=8,
    ),
    "flux": dict(
        FLUX_DEV,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
}
# family -> (denoiser class, config, latent channels, latent side at the family's resolution, text tokens,
#            text width, pooled width, resolution in pixels)
FAMILIES = {
    "sdxl": (UNet2DConditionModel, SDXL_UNET, 4, 128, 77, 2048, 1280, 1024),
    "sd3": (SD3Transformer2DModel, SD3_MEDIUM, 16, 64, 333, 4096, 2048, 512),
    "flux": (FluxTransformer2DModel, FLUX_DEV, 16, 64, 512, 4096, 768, 512),
}
TINY_SHAPES = {"sdxl": (4, 8, 6, 32, 32, 64), "sd3": (4, 8, 6, 32, 32, 64), "flux": (4, 8, 6, 32, 32, 64)}


def inputs(family: str, pairs: int, tiny: bool, device: torch.device, dtype: torch.dtype, generator: torch.Generator):
    """Random conditioning and latents of one step: a dict of the step's tensors (``2 * pairs`` rows)."""
    _, _, channels, side, tokens, width, pooled, resolution = FAMILIES[family]
    if tiny:
        channels, side, tokens, width, pooled, resolution = TINY_SHAPES[family]
    rows = 2 * pairs

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    noise = randn(pairs, channels, side, side).repeat(2, 1, 1, 1)  # a pair shares noise and timestep
    if family == "sdxl":
        t = torch.randint(0, 1000, (pairs,), generator=generator).repeat(2).to(device)
    else:
        t = torch.rand(pairs, generator=generator).repeat(2).to(device)  # σ in (0, 1)
    extra = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return dict(
        latents=randn(rows, channels, side, side),
        noise=noise,
        timesteps=t,
        embeddings=randn(rows, tokens, width).to(dtype),
        pooled=randn(rows, pooled).to(dtype),
        time_ids=extra.repeat(rows, 1).to(device, dtype),
    )


def noised(family: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, target): epsilon prediction with a linear-beta DDPM schedule for SDXL, flow
    matching (x_t = (1 - σ) x0 + σ ε, target ε - x0) for SD3 and Flux."""
    x0, eps, t = batch["latents"], batch["noise"], batch["timesteps"]
    if family == "sdxl":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, device=x0.device) ** 2
        abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, eps
    sigma = t.view(-1, 1, 1, 1)
    return (1 - sigma) * x0 + sigma * eps, eps - x0


def forward(family: str, model, noisy: torch.Tensor, batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """The denoiser's prediction ``[2B, C, h, w]`` float32, called as the family does."""
    emb, pooled = batch["embeddings"], batch["pooled"]
    if family == "sdxl":
        cond = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        return model(noisy.to(dtype), batch["timesteps"], emb, added_cond_kwargs=cond).sample.float()
    if family == "sd3":
        return model(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            timestep=batch["timesteps"] * 1000,
        ).sample.float()
    rows, channels, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, rows, channels, h, w).to(dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(rows, h // 2, w // 2, noisy.device, dtype)
    txt_ids = torch.zeros(emb.shape[1], 3, device=noisy.device, dtype=dtype)
    guidance = torch.full((rows,), 3.5, device=noisy.device, dtype=torch.float32)
    out = model(
        hidden_states=packed,
        encoder_hidden_states=emb,
        pooled_projections=pooled,
        timestep=batch["timesteps"],
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
    ).sample
    return FluxPipeline._unpack_latents(out.float(), h * 8, w * 8, 8)  # pixel size at VAE factor 8 -> latent side h


def build(family: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The family's denoiser at random init (seed 0), initialised on ``device`` in ``dtype``, with
    float32 rank-8 LoRA adapters: ``(model, trainable params)``."""
    cls, config, *_ = FAMILIES[family]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 12 B-parameter float32 init on the host would take minutes
    try:
        with torch.device(device):
            model = cls(**(TINY[family] if tiny else config))
    finally:
        torch.set_default_dtype(default)
    return model, add_lora(model, 8, dtype, LORA_TARGETS)


def bench(family: str, *, pairs: int, steps: int, warmup: int, tiny: bool, device: torch.device) -> dict:
    """Time ``steps`` LoRA DPO steps of ``family`` after ``warmup``; returns the CSV row."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, params = build(family, tiny, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = inputs(family, pairs, tiny, device, dtype, torch.Generator().manual_seed(1))
    noisy, target = noised(family, batch)

    def step():
        model_pred = forward(family, model, noisy, batch, dtype)
        with torch.no_grad():
            model.disable_adapters()
            ref_pred = forward(family, model, noisy, batch, dtype)
            model.enable_adapters()
        loss, _ = fastpref.diffusion_dpo_loss(model_pred, ref_pred, target, beta=5000.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - begin)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return dict(
        family=family,
        resolution=FAMILIES[family][-1] if not tiny else TINY_SHAPES[family][-1],
        pairs=pairs,
        denoiser_params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        step_ms=round(seconds * 1000, 2),
        steps_per_s=round(1 / seconds, 3),
        pairs_per_s=round(pairs / seconds, 3),
        peak_memory_gib=round(peak, 2),
        loss_finite=bool(torch.isfinite(loss).item()),  # host-ok: benchmark, after timing
    )


def perturb_lora(params: list[torch.nn.Parameter], std: float) -> None:
    """Seeded nonzero adapters (``N(0, std)`` on every LoRA matrix, drawn on the host): the
    policy differs from the reference, so the sweep's first-step losses compare real numbers."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def sweep(args, device: torch.device) -> list[dict]:
    """``--sweep``: every provider of ``flow_providers`` for every family, one fresh model each;
    returns the CSV rows (one per family and provider that ran) and writes CSV and meta."""
    import bench_train_step as ts
    import csv_io
    import flow_providers as fp
    import speed_providers as sp

    # bf16 at real size on CUDA; float32 for --tiny (the smoke test compares the providers' losses)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.tiny else torch.float32
    env = csv_io.environment(device.type)
    peak, peak_src = ts.peak_tflops(env["device"], args.peak_tflops)
    notes, rows, t0 = [], [], time.time()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for family in args.families:
        batch = inputs(family, args.pairs, args.tiny, device, dtype, torch.Generator().manual_seed(1))
        noisy, target = noised(family, batch)
        flops = None
        for provider in args.providers:
            why = fp.refusal(provider, args.compile_backend)
            if why:
                notes.append(f"SKIP {family} {provider}: {why}")
                print(notes[-1], flush=True)
                continue
            model = params = step = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            try:
                model, params = build(family, args.tiny, device, dtype)
                perturb_lora(params, args.lora_std)
                run = functools.partial(forward, family, model, dtype=dtype)
                if flops is None:  # one 2B-row forward, the unit of the analytic step FLOPs
                    with torch.no_grad():
                        flops = sp.analytic_flops(ts.count_flops(functools.partial(run, noisy, batch)))
                step = fp.make_step(provider, model, params, run, noisy, target, batch, args.compile_backend)
                first_s, loss = None, None
                for call in range(max(args.warmup, 1)):
                    begin = time.perf_counter()
                    out = step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if call == 0:
                        first_s, loss = time.perf_counter() - begin, float(out)  # host-ok: after the call
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = ts.time_steps(step, args.steps, device.type)
                peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            except Exception as e:  # record and go on (out of memory, a backend that cannot run)
                notes.append(f"ERROR {family} {provider}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print(notes[-1], flush=True)
                continue
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                torch._dynamo.reset()  # the next provider's model compiles afresh
                del model, params, step
            ms = statistics.median(times)
            flags = fp.flow_flags(provider)
            row = dict(
                family=family,
                provider=provider,
                flags=" ".join(f"{k}={v}" for k, v in flags.items()),
                resolution=TINY_SHAPES[family][-1] if args.tiny else FAMILIES[family][-1],
                pairs=args.pairs,
                step_ms=round(ms, 3),
                steps_per_s=round(1e3 / ms, 4),
                pairs_per_s=round(args.pairs * 1e3 / ms, 4),
                ratio_vs_flow_grpo=None,
                peak_memory_gib=None if peak_mem is None else round(peak_mem, 3),
                compile_s=round(max(first_s - ms * 1e-3, 0.0), 3) if flags.get("compile_denoiser") else None,
                model_tflop_per_step=flops / 1e12,
                mfu_pct=round(100.0 * flops / (ms * 1e-3) / (peak * 1e12), 2)
                if peak and device.type == "cuda"
                else None,
                first_loss=loss,
            )
            rows.append(row)
        base = [r for r in rows if r["family"] == family and r["provider"] == fp.BASELINE]
        for r in rows:
            if r["family"] == family and base:
                r["ratio_vs_flow_grpo"] = round(r["steps_per_s"] / base[0]["steps_per_s"], 4)
        for r in rows:
            if r["family"] == family:
                print(r, flush=True)
        del batch, noisy, target
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    meta = {
        "command": csv_io.command_line(),
        "env": env,
        "notes": notes,
        "elapsed_s": round(time.time() - t0, 1),
        "peak_tflops": peak,
        "peak_source": peak_src,
        "flop_formula": "denoiser forward FLOPs over 2B rows (FlopCounterMode) x (1 policy + 1 reference + 2 backward)",
    }
    csv_io.write_meta(str(out), meta)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), help="default: all (--sweep: sd3 flux)")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="scaled-down configurations (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", help="CSV path (default benchmarks/results/family_step.csv, --sweep: family_sweep.csv)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="flow families: flow_grpo's step vs fastpref's speed options"
    )
    parser.add_argument("--providers", help="--sweep: comma list (default: all of flow_providers.FLOW_SWEEP)")
    parser.add_argument("--compile-backend", default="inductor", help="--sweep: torch.compile backend of +compile")
    parser.add_argument("--peak-tflops", type=float, help="--sweep: dense bf16 peak of the device for MFU")
    parser.add_argument("--lora-std", type=float, default=0.02, help="--sweep: std of the seeded LoRA weights")
    args = parser.parse_args(argv)
    for name in ("pairs", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected >= 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise ValueError(f"--device: real-size configurations need CUDA, got {args.device!r} (use --tiny on CPU)")
    if args.sweep:
        import flow_providers

        args.families = args.families or ["sd3", "flux"]
        if "sdxl" in args.families:
            raise ValueError(f"--families: --sweep is for the flow families (sd3, flux), got {args.families}")
        args.providers = [p.strip() for p in (args.providers or ",".join(flow_providers.FLOW_SWEEP)).split(",") if p]
        for provider in args.providers:
            flow_providers.flow_flags(provider)  # unknown names: ValueError naming --providers
        args.out = args.out or "benchmarks/results/family_sweep.csv"
        return sweep(args, device)
    args.out = args.out or "benchmarks/results/family_step.csv"
    args.families = args.families or list(FAMILIES)
    rows = []
    for family in args.families:
        row = bench(family, pairs=args.pairs, steps=args.steps, warmup=args.warmup, tiny=args.tiny, device=device)
        print(row, flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
