"""The trainer's checks that need files (the model directory, the data, a resume checkpoint),
run before anything is loaded or written: ``validate(config)``. The checks of single flags are
``fastpref.training.config.parse_config``'s; this module adds those that read the disk or the
environment (torchrun's, CUDA) and returns what they read, for ``fastpref.training.run.build``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fastpref.training.checkpoint import resolve_resume
from fastpref.training.config import Config
from fastpref.training.data import PreferencePairs
from fastpref.training.family import family_class
from fastpref.training.fsdp import fsdp_refusal
from fastpref.training.graph import graph_refusal
from fastpref.training.latent_cache import check_cache_flags
from fastpref.training.losses import LossType, get_loss_type
from fastpref.training.sources import preference_sources
from fastpref.training.speed import check_speed


def validate(config: Config) -> tuple[Config, LossType, PreferencePairs, Path | None]:
    """Every check that needs files, before anything is written: returns (config with the
    resolution filled in, loss type, pairs, resume checkpoint or None)."""
    loss_type = get_loss_type(config.loss_type)
    if config.train_batch_size < loss_type.min_pairs:
        raise ValueError(
            f"--train_batch_size: --loss_type {config.loss_type} needs at least "
            f"{loss_type.min_pairs} pairs per process, got {config.train_batch_size}"
        )
    family = family_class(config.pretrained_model_name_or_path)
    factor = family.check(config.pretrained_model_name_or_path)
    family.check_flags(config)
    pairs = None
    if family.media == "videos":  # video pairs: the clip length and the default size come from the data
        from fastpref.training.video_data import read_video_pairs

        if config.online_pairs_every is not None:
            raise ValueError(
                f"--online_pairs_every: on-line pairs are made for image families; {family.__name__} trains on "
                f"videos: make the set with fastpref-pairs (it writes a video index) and pass it as --dataset_name"
            )

        pairs, config = read_video_pairs(config, family)
    resolution = config.resolution or family.default_resolution(config.pretrained_model_name_or_path)
    config = config.replace(resolution=resolution)
    if config.resolution % factor:
        raise ValueError(
            f"--resolution: expected a multiple of the VAE downsampling factor {factor}, got {config.resolution}"
        )
    family.check_resolution(config.pretrained_model_name_or_path, config.resolution)
    if pairs is None:
        sources = preference_sources(
            config.data_path, config.data_argument, split=config.dataset_split, streaming=config.dataset_streaming
        )
        pairs = PreferencePairs(sources, config.data_argument, skip_bad_rows=config.skip_bad_rows)
    resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    refusal = fsdp_refusal(config, os.environ)
    if refusal:
        raise ValueError(refusal)
    if config.cuda_graph:
        refusal = graph_refusal(
            cuda_available=torch.cuda.is_available(),
            gradient_checkpointing=config.gradient_checkpointing,
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )
        if refusal:
            raise ValueError(refusal)
    check_speed(config)
    check_cache_flags(config, family)
    return config, loss_type, pairs, resume
