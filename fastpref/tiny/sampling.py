"""Sampling a Stable-Diffusion-layout pipeline into uint8 images, one seed per image."""

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def sample_images(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    batch_size: int = 128,
) -> np.ndarray:
    """Generate one image per (prompt, seed) with DDIM: ``[N, H, W, 3]`` uint8.

    Each image's initial noise comes from its own seed, so two pipelines sampled with the
    same ``seeds`` start from identical noise (the paired comparison of the demo).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        with torch.no_grad():
            images = pipe(
                prompt=prompts[chunk],
                generator=generators,
                output_type="np",
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            ).images
        out.append(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
    return np.concatenate(out)
