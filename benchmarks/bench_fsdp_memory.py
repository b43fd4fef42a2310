"""Peak GPU memory of one full fine-tuning Diffusion-DPO step with a frozen reference copy
(``--reference copy``), unsharded against FSDP2-sharded as ``--fsdp`` shards it.

    python benchmarks/bench_fsdp_memory.py                          # CUDA: SDXL 1024 px, the three modes
    torchrun --nproc_per_node 8 benchmarks/bench_fsdp_memory.py --modes fsdp   # per-GPU peak over 8 GPUs
    python benchmarks/bench_fsdp_memory.py --tiny --device cpu      # smoke (gloo, no figures)

The step is the trainer's layout at random init (the denoiser configurations and inputs of
``bench_family_step.py``): the trained denoiser in float32 under bf16 autocast (``plain``) or
FSDP2's bf16 mixed-precision policy (``fsdp``, ``fsdp_offload``: parameters, gradients and AdamW
state in host memory), the frozen reference in bf16 (sharded alike under FSDP2), the policy
forward over ``2B`` rows, the reference forward under ``no_grad``, ``fastpref.diffusion_dpo_loss``,
backward, gradient clipping 1.0 and AdamW. Each mode runs in a process of its own (one ``python``
call per mode here), so each peak (``torch.cuda.max_memory_allocated`` over the second step)
is its own. One process alone: FSDP2 over one GPU shards nothing, and ``fsdp`` shows the policy's
overhead; ``fsdp_offload`` is the one-GPU memory saving. Written as CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fastpref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_family_step import FAMILIES, TINY, forward, inputs, noised

from fastpref.training.fsdp import shard_module

MODES = ("plain", "fsdp", "fsdp_offload")


def _join_group(device: torch.device) -> None:
    """Join torchrun's group, or make a one-process group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def measure(family: str, mode: str, *, pairs: int, tiny: bool, device: torch.device) -> dict:
    """Two steps of ``mode``; returns the CSV row (peak over the second step)."""
    cls, config, *_ = FAMILIES[family]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = cls(**(TINY[family] if tiny else config)).to(device)
    reference = copy.deepcopy(model).requires_grad_(False).to(dtype)
    world = 1
    if mode != "plain":
        _join_group(device)
        world = dist.get_world_size()
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        precision = "bf16" if dtype == torch.bfloat16 else "no"
        shard_module(model, mesh, precision, cpu_offload=mode == "fsdp_offload")
        shard_module(reference, mesh, precision, cpu_offload=mode == "fsdp_offload")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch = inputs(family, pairs, tiny, device, dtype, torch.Generator().manual_seed(1))
    noisy, target = noised(family, batch)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=mode == "plain" and dtype != torch.float32)

    def step():
        with autocast:
            model_pred = forward(family, model, noisy, batch, dtype)
            with torch.no_grad():
                ref_pred = forward(family, reference, noisy, batch, dtype)
        loss, _ = fastpref.diffusion_dpo_loss(model_pred, ref_pred, target, beta=5000.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = dict(
        family=family,
        mode=mode,
        processes=world,
        pairs=pairs,
        denoiser_params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),  # DTensor: global
        peak_memory_gib=round(peak, 2),
        loss_finite=bool(torch.isfinite(loss).item()),  # host-ok: benchmark, after the step
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sdxl", choices=sorted(FAMILIES))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny configurations (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="CSV file to write")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child of one mode
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"--modes: expected some of {list(MODES)}, got {bad}")
    if args.one or "WORLD_SIZE" in os.environ or len(modes) == 1:
        rows = [
            measure(args.family, m, pairs=args.pairs, tiny=args.tiny, device=torch.device(args.device)) for m in modes
        ]
    else:  # one process per mode: each peak and each process group its own
        rows = []
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--family",
                args.family,
                "--modes",
                mode,
                "--pairs",
                str(args.pairs),
            ]
            cmd += ["--device", args.device] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))  # the child's last line: its row
    if args.one or "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", "0")) != 0:
        print(json.dumps(rows[0]) if args.one else "")
        return rows
    for row in rows:
        print(row)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
