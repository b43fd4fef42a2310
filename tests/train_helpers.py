"""Helpers of the training tests: tiny Pick-a-Pic tables and short trainer runs."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fastpref.training.args import DEFAULT_MODEL

FAST = ["--pretrained_model_name_or_path", str(DEFAULT_MODEL),
        "--train_batch_size", "1", "--report_to", "none", "--learning_rate", "1e-3"]


def png_bytes(value: int, size: int = 32) -> bytes:
    """A uniform ``size`` x ``size`` PNG whose red channel is ``value``."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0] = value
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(path, labels, captions=None, drop_column=None):
    """A parquet of pairs ``(png(10 i), png(10 i + 5))`` with the given ``label_0`` values."""
    columns = {
        "jpg_0": [png_bytes(10 * i) for i in range(len(labels))],
        "jpg_1": [png_bytes(10 * i + 5) for i in range(len(labels))],
        "label_0": [float(x) for x in labels],
        "caption": captions or [f"caption {i}" for i in range(len(labels))],
    }
    if drop_column:
        del columns[drop_column]
    pq.write_table(pa.table(columns), path)
    return path


def tiny_step(device, static: bool, loss_type: str, weight_dtype=None):
    """The bundled tiny model with LoRA rank 4 (seeded), an AdamW (``static``: the tensor-LR one
    a captured step needs) with a linear schedule (warm-up 2 of 6 steps), and its ``TrainStep``.
    Returns ``(params, step, lr_scheduler, encoders)``."""
    import torch
    from diffusers.optimization import get_scheduler

    from fastpref.training.batches import Encoders
    from fastpref.training.graph import make_optimizer
    from fastpref.training.losses import LOSS_TYPES
    from fastpref.training.models import add_lora, load_components, set_attention
    from fastpref.training.step import TrainStep, preference_loss

    weight_dtype = weight_dtype or torch.float32
    tokenizer, text_encoder, vae, unet, scheduler = load_components(DEFAULT_MODEL, device, weight_dtype)
    set_attention(unet, False)
    torch.manual_seed(0)
    params = add_lora(unet, 4, weight_dtype)
    optimizer = make_optimizer(params, 2e-3, static=static, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32,
                              cache_enabled=False)

    def policy(x, t, e):
        with autocast:
            return unet(x, t, e).sample

    def reference(x, t, e):
        unet.disable_adapters()
        try:
            with autocast:
                return unet(x, t, e).sample
        finally:
            unet.enable_adapters()

    step = TrainStep(lambda b: preference_loss(policy, reference, scheduler, LOSS_TYPES[loss_type], b),
                     params, optimizer, max_grad_norm=1.0)
    encoders = Encoders(vae, tokenizer, text_encoder, 1000, device, weight_dtype, 32, True, True, 0)
    return params, step, lr_scheduler, encoders
