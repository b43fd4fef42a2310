"""Helpers of the training tests: tiny Pick-a-Pic tables and short trainer runs."""

import io
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fastpref.training.args import DEFAULT_MODEL

FAST = [
    "--pretrained_model_name_or_path",
    str(DEFAULT_MODEL),
    "--train_batch_size",
    "1",
    "--report_to",
    "none",
    "--learning_rate",
    "1e-3",
]


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


def tiny_run(device, static: bool, loss_type: str, **flags):
    """The trainer's run (``fastpref.train.build``) on the bundled tiny model: LoRA rank 4, an
    AdamW (``static``: the tensor-LR one a captured step needs, i.e. ``--cuda_graph``, let
    through on a machine without CUDA) at LR 2e-3 with a linear schedule (warm-up 2 of 6
    steps), random crops, SDPA attention; ``flags`` override. ``device`` must be the trainer's (CUDA where there
    is one)."""
    import pytest
    import torch

    from fastpref import train
    from fastpref.training import validation
    from fastpref.training.config import parse_config

    defaults = dict(
        pretrained_model_name_or_path=str(DEFAULT_MODEL),
        train_batch_size=1,
        report_to="none",
        learning_rate=2e-3,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        max_train_steps=6,
        random_crop=True,
    )
    config = parse_config(**{**defaults, **flags}, loss_type=loss_type, cuda_graph=static)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validation, "graph_refusal", lambda **_: None)
        run = train.build(config)
    run.family.set_attention(False)  # PyTorch SDPA even where xformers runs (deterministic on CUDA)
    assert run.dist.device.type == torch.device(device).type, (run.dist.device, device)
    return run


def tiny_step(device, static: bool, loss_type: str):
    """``tiny_run``'s ``(params, eager TrainStep, lr_scheduler, encoders)``."""
    run = tiny_run(device, static, loss_type)
    return run.params, run.train_step, run.lr_scheduler, run.encoders


def sigterm_after_logging(monkeypatch, at_step: int):
    """Make the trainer send itself SIGTERM right after it logs step ``at_step`` (the stop
    handler then finishes that step and writes its checkpoint). Returns the real
    ``MetricsLogger.log``, to put back before a resume."""
    from fastpref.training.logging import MetricsLogger

    logged = MetricsLogger.log

    def log_then_signal(self, step, values):
        logged(self, step, values)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_signal)
    return logged
