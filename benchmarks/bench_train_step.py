"""Whole Diffusion-DPO training step: SD1.5 UNet + LoRA, eager diffusers loss vs fastpref,
eager and as the trainer's CUDA-graph step.

    python benchmarks/bench_train_step.py              # B = 1,4,8 pairs, 10 timed steps each
    python benchmarks/bench_train_step.py --quick      # B = 4, 5 timed steps
    python benchmarks/bench_train_step.py --tiny --device cpu --steps 1 --batches 1   # smoke
    python benchmarks/bench_train_step.py --sweep --quick   # script vs each speed option and the full stack

``--sweep`` (``speed_providers.py``): the diffusers script's step as the script does it
(on-line VAE and text encoding, eager loss) against fastpref's step with each trainer speed
option alone and all together, one fresh UNet per provider; steps/s, pairs/s, peak memory,
compile time (the first call's excess over a timed step) and MFU with the analytic FLOPs of
``speed_providers.analytic_flops`` (UNet forward FLOPs x 4: policy forward, reference forward,
a backward of two forwards).

The step follows diffusers' ``train_diffusion_dpo.py`` (bf16 weights, LoRA rank 8 on
to_q/to_k/to_v/to_out.0 with alpha = rank and gaussian init, AdamW on the LoRA parameters,
grad-norm clip 1.0): policy forward, reference forward with the adapters disabled under
``no_grad``, loss, backward, clip, optimizer step, zero_grad. Only the loss differs:
``reference_blocks.diffusers_dpo`` (beta_dpo 2500) or ``fastpref.diffusion_dpo_loss``
(beta 5000, the same loss). Provider ``fastpref-cudagraph`` is the same step run by the
trainer's ``--cuda_graph`` machinery (``fastpref.training.graph.StaticStep`` around a
``TrainStep``, capturable AdamW with a tensor LR, built by ``fastpref.training.run.optimizer_and_schedule``
and ``make_step`` from a ``--cuda_graph`` config): 3 eager warm-up steps, capture, then timed
replays (CUDA only; autocast without its weight cache, as the trainer runs it). Inputs are
random: 512 px latents ``[2B, 4, 64, 64]``, text embeddings ``[2B, 77, 768]``, timesteps shared
within a pair. Weights are random (the SD1.5
UNet config is written inline; nothing is downloaded).

Figures: time per step (CUDA events, p20/p50/p80 over the timed steps, after warm-up),
steps/s, memory, UNet FLOPs of one step counted with ``torch.utils.flop_counter.FlopCounterMode``,
and model FLOP utilisation = FLOPs / step time / the device's dense bf16 peak (table below or
``--peak-tflops``). Memory, CUDA only: ``peak_memory`` is ``max_memory_allocated`` over the timed
steps, which does not see a CUDA graph's private pool (a replay allocates nothing; the
activations the capture freed stay reserved for the graph); ``peak_reserved_memory`` is
``max_memory_reserved`` over the timed steps, the cache emptied before each provider's
warm-up, i.e. what the caching allocator holds for that provider (the model, its warm-up's
cached blocks and a graph's pool included), the comparable footprint; ``graph_pool_memory``
(captured provider) is the growth of reserved memory over the capture call.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csv_io
import reference_blocks as rb

HERE = os.path.dirname(os.path.abspath(__file__))

# Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json values)
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# a miniature of the same architecture for CPU smoke tests (--tiny)
TINY_UNET_CONFIG = dict(
    SD15_UNET_CONFIG,
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=16,
)
# dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by device-name substring
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
]
TEXT_LEN = 77
LORA_RANK = 8


def _require_libs():
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"bench_train_step.py needs diffusers and peft ({e}). Install them, e.g. "
            "`pip install diffusers peft` (offline: `pip install --no-deps <diffusers wheel>`; "
            "diffusers also needs huggingface_hub, safetensors, regex, importlib_metadata)."
        ) from None


def build_unet(config: dict, device: str, dtype: torch.dtype):
    """Random-weight UNet in ``dtype`` with a rank-8 LoRA adapter, as the diffusers script sets it up."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: much faster than on the host
        unet = UNet2DConditionModel(**config)
    unet.requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    unet.add_adapter(
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    unet.train()
    return unet


def make_batch(config: dict, B: int, device: str, dtype: torch.dtype):
    """Random paired batch: noisy latents, timesteps shared per pair, text embeddings, target."""
    g = torch.Generator().manual_seed(B)
    s = config["sample_size"]
    shape = (2 * B, config["in_channels"], s, s)
    noisy = torch.randn(shape, generator=g).to(device, dtype)
    noise = torch.randn(shape, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (B,), generator=g).repeat(2).to(device)
    emb = torch.randn(2 * B, TEXT_LEN, config["cross_attention_dim"], generator=g).to(device, dtype)
    return noisy, t, emb, noise


def make_loss(provider: str):
    """The loss block under test, returning the loss tensor only."""
    if provider == "eager-diffusers":
        return lambda p, r, t: rb.diffusers_dpo(p, r, t, beta_dpo=2500.0, loss_type="sigmoid")[0]
    import fastpref

    return lambda p, r, t: fastpref.diffusion_dpo_loss(p, r, t, beta=5000.0, loss_type="sigmoid")[0]


def train_step(unet, opt, params, batch, loss_fn, dtype, device):
    """One optimisation step as in diffusers' train_diffusion_dpo.py."""
    noisy, t, emb, target = batch
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        model_pred = unet(noisy, t, emb).sample
        unet.disable_adapters()
        with torch.no_grad():
            ref_pred = unet(noisy, t, emb).sample.detach()
        unet.enable_adapters()
    loss = loss_fn(model_pred, ref_pred, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def graphed_step(unet, params, batch, dtype, device):
    """The trainer's captured step (``fastpref-cudagraph``): returns ``(step, eager_step)``;
    ``step()`` replays after ``WARMUP_STEPS`` side-stream calls and one capture. Optimizer and
    step come from the trainer's own builders (``fastpref.training.run.optimizer_and_schedule`` and
    ``make_step``) for the config ``--cuda_graph --learning_rate 1e-8``; only the model (random
    SD1.5 weights) and the pre-noised batch are the benchmark's."""
    import fastpref
    from fastpref.training.config import parse_config
    from fastpref.training.models import adapters_disabled
    from fastpref.training.run import make_step, optimizer_and_schedule

    config = parse_config(cuda_graph=True, learning_rate=1e-8)
    opt, _ = optimizer_and_schedule(config, params)

    def loss_fn(b):
        noisy, t, emb, target = b
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            model_pred = unet(noisy, t, emb).sample
            with adapters_disabled(unet), torch.no_grad():
                ref_pred = unet(noisy, t, emb).sample
        return fastpref.diffusion_dpo_loss(model_pred, ref_pred, target, beta=5000.0)

    inner, static = make_step(config, loss_fn, params, opt)
    return (lambda: static([batch])), (lambda: inner([batch]))


def count_flops(step) -> float:
    """FLOPs of one call of ``step`` (UNet matmuls, convolutions and attention dominate)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str]:
    """Dense bf16 peak for MFU and where it came from."""
    if override:
        return override, "--peak-tflops"
    for key, v in PEAK_BF16_TFLOPS:
        if key in device_name:
            return v, f"table entry {key!r}"
    return None, "unknown device: pass --peak-tflops"


def run(args) -> None:
    """Benchmark every (B, provider) and write the CSV."""
    _require_libs()
    device = args.device
    dtype = torch.bfloat16
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
    env = csv_io.environment(device)
    w = csv_io.CsvWriter(args.out, env)
    peak, peak_src = peak_tflops(env["device"], args.peak_tflops)
    notes = []
    t0 = time.time()
    unet = build_unet(config, device, dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    print(
        f"UNet params {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M, LoRA trainable "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M, peak {peak} TFLOP/s ({peak_src})",
        flush=True,
    )
    kernel = "train_step_sd15_lora8" + ("_tiny" if args.tiny else "")
    for B in args.batches:
        batch = make_batch(config, B, device, dtype)
        for provider in args.providers:
            if provider == "fastpref-cudagraph" and device != "cuda":
                notes.append(f"SKIP {provider}: needs CUDA")
                print(notes[-1], flush=True)
                continue
            warmup, flops, capture_at, pool = args.warmup, None, None, None
            step = eager_step = None  # drop the last provider's step (a graph holds its pool)
            if device == "cuda":  # reserved memory from here on is this provider's (and the model's)
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            if provider == "fastpref-cudagraph":
                from fastpref.training.graph import WARMUP_STEPS

                step, eager_step = graphed_step(unet, params, batch, dtype, device)
                capture_at = WARMUP_STEPS  # the call that captures (and replays once)
                warmup += WARMUP_STEPS + 1  # side-stream warm-up and the capture, untimed
            else:
                loss_fn = make_loss(provider)
                opt = torch.optim.AdamW(params, lr=1e-8, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

                step = functools.partial(train_step, unet, opt, params, batch, loss_fn, dtype, device)

            try:
                for call in range(warmup):
                    if call == capture_at and device == "cuda":
                        torch.cuda.synchronize()
                        reserved = torch.cuda.memory_reserved()
                    step()
                    if call == capture_at and device == "cuda":
                        torch.cuda.synchronize()
                        pool = (torch.cuda.memory_reserved() - reserved) / 2**30
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = time_steps(step, args.steps, device)
                mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                reserved_peak = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None
                # a replay dispatches nothing to count: the captured provider counts its eager
                # step, after the timing so that its cached blocks are not in the figures above
                flops = count_flops(eager_step if eager_step is not None else step)
            except Exception as e:  # record and go on (e.g. out of memory at large B)
                notes.append(f"ERROR {provider} B={B}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print(notes[-1], flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            tt = torch.tensor(times, dtype=torch.float64)
            q = tuple(float(torch.quantile(tt, x)) for x in (0.2, 0.5, 0.8))
            row = dict(
                kernel=kernel,
                provider=provider,
                mode="full",
                x_name="B",
                x_value=B,
                dtype="bf16",
                shape_name="sd15_512" if not args.tiny else "tiny",
                shape=tuple(batch[0].shape),
                extra={
                    "lora_rank": LORA_RANK,
                    "steps": args.steps,
                    "warmup": warmup,
                    "peak_tflops": peak,
                    "peak_source": peak_src,
                    "text_len": TEXT_LEN,
                },
            )
            w.add(metric="train_step_time", unit="ms", y=q, **row)
            w.add(metric="steps_per_s", unit="1/s", y=1e3 / q[1], **row)
            w.add(metric="unet_tflop_per_step", unit="TFLOP", y=flops / 1e12, **row)
            if mem is not None:
                w.add(metric="peak_memory", unit="GiB", y=mem, **row)
                w.add(metric="peak_reserved_memory", unit="GiB", y=reserved_peak, **row)
            if pool is not None:
                w.add(metric="graph_pool_memory", unit="GiB", y=pool, **row)
            mfu = None
            if peak and device == "cuda":
                mfu = 100.0 * flops / (q[1] * 1e-3) / (peak * 1e12)
                w.add(metric="mfu", unit="%", y=mfu, **row)
            w.flush()
            print(
                f"B={B:<3d} {provider:16s} step {q[1]:.2f} ms (p20 {q[0]:.2f}, p80 {q[2]:.2f}), "
                f"{1e3 / q[1]:.3f} steps/s, {flops / 1e12:.3f} TFLOP/step"
                + (f", peak allocated {mem:.2f} GiB, peak reserved {reserved_peak:.2f} GiB" if mem is not None else "")
                + (f" (graph pool {pool:.2f} GiB)" if pool is not None else "")
                + (f", MFU {mfu:.1f}%" if mfu is not None else ""),
                flush=True,
            )
        del batch
    w.close()
    csv_io.write_meta(
        args.out,
        {
            "command": csv_io.command_line(),
            "env": env,
            "notes": notes,
            "elapsed_s": round(time.time() - t0, 1),
            "peak_tflops": peak,
            "peak_source": peak_src,
        },
    )
    print(f"wrote {w.n} rows to {args.out}", flush=True)


def unet_forward_flops(unet, batch, dtype, device) -> float:
    """FLOPs of one UNet forward on the sweep's batch (``FlopCounterMode``: matmuls,
    convolutions, attention), the unit of ``speed_providers.analytic_flops``."""
    from torch.utils.flop_counter import FlopCounterMode

    noisy, t, emb, _ = batch
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype), FlopCounterMode(display=False) as fc:
        unet(noisy, t, emb)
    return float(fc.get_total_flops())


def time_steps(step, steps: int, device: str) -> list[float]:
    """Milliseconds of each of ``steps`` calls (CUDA events on CUDA)."""
    times = []
    for _ in range(steps):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            a = time.perf_counter()
            step()
            times.append((time.perf_counter() - a) * 1e3)
    return times


def run_sweep(args) -> None:
    """``--sweep``: the script's step against fastpref's with each speed option and the full
    stack (``speed_providers``), one fresh UNet per provider; writes the CSV."""
    import speed_providers as sp

    _require_libs()
    device, dtype = args.device, torch.bfloat16
    config = TINY_UNET_CONFIG if args.tiny else SD15_UNET_CONFIG
    env = csv_io.environment(device)
    w = csv_io.CsvWriter(args.out, env)
    peak, peak_src = peak_tflops(env["device"], args.peak_tflops)
    notes, t0 = [], time.time()
    enc = sp.build_encoders(args.tiny, device, dtype)
    kernel = "train_step_sweep_sd15_lora8" + ("_tiny" if args.tiny else "")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for B in args.batches:
        inputs = sp.make_inputs(enc, config, B, device, dtype)
        forward = None
        for provider in args.providers:
            why = None if provider == "script" else sp.refusal(provider, args.compile_backend)
            if why:
                notes.append(f"SKIP {provider}: {why}")
                print(notes[-1], flush=True)
                continue
            step = eager = unet = None
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            try:
                unet = build_unet(config, device, dtype)
                params = [p for p in unet.parameters() if p.requires_grad]
                if forward is None:
                    forward = unet_forward_flops(unet, make_batch(config, B, device, dtype), dtype, device)
                if provider == "script":
                    step, eager = sp.script_step(unet, params, enc, inputs, dtype, device)
                else:
                    step, eager = sp.stack_step(
                        unet, params, enc, inputs, dtype, device, provider, args.compile_backend
                    )
                flags = sp.option_flags(provider)
                warmup = args.warmup + (4 if flags.get("cuda_graph") else 0)  # 3 side-stream steps and the capture
                first = None
                for call in range(warmup):
                    a = time.perf_counter()
                    step()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if call == 0:
                        first = time.perf_counter() - a
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times = time_steps(step, args.steps, device)
                mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
                reserved = torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None
            except Exception as e:  # record and go on (out of memory, a backend that cannot run)
                notes.append(f"ERROR {provider} B={B}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print(notes[-1], flush=True)
                continue
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
                torch._dynamo.reset()  # the next provider's UNet compiles afresh
            tt = torch.tensor(times, dtype=torch.float64)
            q = tuple(float(torch.quantile(tt, x)) for x in (0.2, 0.5, 0.8))
            flops = sp.analytic_flops(forward)
            row = dict(
                kernel=kernel,
                provider=provider,
                mode="full",
                x_name="B",
                x_value=B,
                dtype="bf16",
                shape_name="sd15_512" if not args.tiny else "tiny",
                shape=tuple(inputs["online"][0].shape),
                extra={"lora_rank": LORA_RANK, "steps": args.steps, "warmup": warmup, "flags": flags},
            )
            w.add(metric="train_step_time", unit="ms", y=q, **row)
            w.add(metric="steps_per_s", unit="1/s", y=1e3 / q[1], **row)
            w.add(metric="pairs_per_s", unit="1/s", y=B * 1e3 / q[1], **row)
            w.add(metric="model_tflop_per_step", unit="TFLOP", y=flops / 1e12, **row)
            if flags.get("compile_denoiser"):  # the first call compiles: its excess over a step
                w.add(metric="compile_time", unit="s", y=max(first - q[1] * 1e-3, 0.0), **row)
            if mem is not None:
                w.add(metric="peak_memory", unit="GiB", y=mem, **row)
                w.add(metric="peak_reserved_memory", unit="GiB", y=reserved, **row)
            mfu = None
            if peak and device == "cuda":
                mfu = 100.0 * flops / (q[1] * 1e-3) / (peak * 1e12)
                w.add(metric="mfu", unit="%", y=mfu, **row)
            w.flush()
            print(
                f"B={B:<3d} {provider:16s} step {q[1]:.2f} ms, {1e3 / q[1]:.3f} steps/s, {B * 1e3 / q[1]:.2f} pairs/s"
                + (f", peak {mem:.2f} GiB" if mem is not None else "")
                + (f", MFU {mfu:.1f}%" if mfu is not None else ""),
                flush=True,
            )
            del step, eager, unet
        del inputs
    w.close()
    csv_io.write_meta(
        args.out,
        {
            "command": csv_io.command_line(),
            "env": env,
            "notes": notes,
            "elapsed_s": round(time.time() - t0, 1),
            "peak_tflops": peak,
            "peak_source": peak_src,
            "flop_formula": "UNet forward FLOPs (FlopCounterMode) x (1 policy + 1 reference + 2 backward)",
        },
    )
    print(f"wrote {w.n} rows to {args.out}", flush=True)


def main(argv=None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8", help="comma list of B (pairs; batch = 2B)")
    p.add_argument(
        "--providers", help="comma list (default: eager-diffusers,fastpref,fastpref-cudagraph; --sweep: all)"
    )
    p.add_argument("--sweep", action="store_true", help="the speed-option sweep (speed_providers.py)")
    p.add_argument("--compile-backend", default="inductor", help="--sweep: torch.compile backend of +compile")
    p.add_argument("--steps", type=int, default=10, help="timed steps per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per point")
    p.add_argument("--quick", action="store_true", help="B=4, 5 timed steps")
    p.add_argument("--tiny", action="store_true", help="miniature UNet (CPU smoke test)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device for MFU")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.steps = "4", 5
    a.batches = [int(x) for x in a.batches.split(",") if x.strip()]
    import speed_providers

    default = ",".join(speed_providers.SWEEP) if a.sweep else "eager-diffusers,fastpref,fastpref-cudagraph"
    a.providers = [x.strip() for x in (a.providers or default).split(",") if x.strip()]
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.out is None:
        name = (
            "train_step" + ("_sweep" if a.sweep else "") + ("_quick" if a.quick else "") + ("_tiny" if a.tiny else "")
        )
        a.out = os.path.join(HERE, "results", f"{name}.csv")
    (run_sweep if a.sweep else run)(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
