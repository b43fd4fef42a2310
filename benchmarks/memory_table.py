"""Per-GPU bytes of the trained state of full fine-tuning with a frozen reference copy
(``--reference copy``, the official Diffusion-DPO recipe) under DDP and under ``--fsdp`` (FSDP2),
COMPUTED from parameter counts, not measured.

    python benchmarks/memory_table.py             # markdown table, 8 GPUs
    python benchmarks/memory_table.py --gpus 16

Each denoiser is built on the meta device (no memory, no download) from its diffusers config,
transcribed below from the model repositories' ``config.json`` (diffusers' own defaults where
they are that model's); parameters are counted from the built module. The trainer's layout:
the trained denoiser in float32 (4 B/param) with float32 gradients (4) and AdamW's two float32
moments (8), the frozen reference in the weight dtype, bf16 (2). DDP holds all of it on every
GPU; FSDP2 holds 1/N of each plus, transiently, the bf16 parameters of the blocks being
all-gathered (the largest block, twice with prefetch). Activations, the text encoders, the VAE
and the allocator's slack are not counted; nor are the unsharded gradients that gradient
accumulation keeps between micro-steps (docs/training.md, "Sharded training (FSDP2)").
"""

from __future__ import annotations

import argparse

import torch

GIB = 2**30
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD35_LARGE = dict(  # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
FLUX_DEV = dict(guidance_embeds=True)  # black-forest-labs/FLUX.1-dev: diffusers' defaults otherwise
WAN_14B = dict()  # Wan-AI/Wan2.1-T2V-14B-Diffusers: diffusers' WanTransformer3DModel defaults


def models() -> dict[str, tuple[str, dict]]:
    """Table name -> (diffusers class name, config)."""
    return {
        "SDXL UNet": ("UNet2DConditionModel", SDXL_UNET),
        "SD3.5-large": ("SD3Transformer2DModel", SD35_LARGE),
        "Flux.1-dev": ("FluxTransformer2DModel", FLUX_DEV),
        "Wan2.1-14B": ("WanTransformer3DModel", WAN_14B),
    }


def count(class_name: str, config: dict) -> tuple[int, int]:
    """(parameters, parameters of the largest block) of the model built on the meta device; a
    block is a member of a top-level ModuleList, the unit ``--fsdp`` shards."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    total = sum(p.numel() for p in model.parameters())
    blocks = [b for child in model.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    largest = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    return total, largest


def per_gpu(params: int, largest_block: int, gpus: int) -> dict[str, dict[str, float]]:
    """GiB per GPU of each part under DDP and FSDP2 over ``gpus`` processes."""
    parts = {"params fp32": 4 * params, "grads fp32": 4 * params, "AdamW fp32": 8 * params}
    parts["reference bf16"] = 2 * params
    ddp = {k: v / GIB for k, v in parts.items()}
    fsdp = {k: v / gpus / GIB for k, v in parts.items()}
    fsdp["gathered blocks bf16"] = 2 * 2 * largest_block / GIB
    ddp["total"], fsdp["total"] = sum(ddp.values()), sum(fsdp.values())
    return {"DDP": ddp, "FSDP2": fsdp}


def table(gpus: int) -> str:
    """The markdown table over ``models()`` at ``gpus`` GPUs."""
    lines = [
        f"| model | parameters | DDP: params + grads + AdamW + reference = total GiB | FSDP2 over {gpus} GPUs: "
        f"same + gathered blocks = total GiB |",
        "|---|---|---|---|",
    ]
    for name, (class_name, config) in models().items():
        params, largest = count(class_name, config)
        m = per_gpu(params, largest, gpus)
        d, f = m["DDP"], m["FSDP2"]
        lines.append(
            f"| {name} | {params / 1e9:.2f} B | {d['params fp32']:.1f} + {d['grads fp32']:.1f} + {d['AdamW fp32']:.1f}"
            f" + {d['reference bf16']:.1f} = **{d['total']:.1f}** | {f['params fp32']:.2f} + {f['grads fp32']:.2f} + "
            f"{f['AdamW fp32']:.2f} + {f['reference bf16']:.2f} + {f['gathered blocks bf16']:.2f} = "
            f"**{f['total']:.1f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="processes FSDP2 shards over")
    print(table(parser.parse_args().gpus))


if __name__ == "__main__":
    main()
