"""On-line preference pairs (``--online_pairs_every N``): the preference set regenerated from
the current policy every N optimizer steps, the on-line DPO of flow_grpo.

At step ``r`` (0, N, 2N, ... before the step ``r + 1`` is taken) the pipeline of
``--pretrained_model_name_or_path``, with the trainer's live denoiser (LoRA adapters on) and
frozen encoders in place of the directory's, samples ``--online_num_samples`` images for each
on-line prompt (``--online_prompts``, default the training set's captions), always from the
seeds ``fastpref.pairs.generate.sample_seed(--seed, prompt, sample)``: the same noise at every
refresh, so the logged reward follows the policy alone. ``--reward`` scores them and each
prompt's best sample is paired with its worst (``--online_min_margin``); that set replaces the
training pairs until the next refresh.

Each set is written to ``<output_dir>/online_pairs/step-<r>.parquet`` (atomically, by rank 0)
before any rank reads it, so a resume from a checkpoint at step ``s`` reads the set of step
``s - s % N`` back and continues with the same batches; a set of step ``s`` itself that a kill
prevented is made again from the checkpoint's policy. Sets no checkpoint needs are removed.
Logged at each refresh: ``online_reward`` (the mean reward of all samples), ``online_pairs`` and
``online_refresh_s`` (seconds spent sampling, scoring and writing).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .args import build_parser
from .checkpoint import list_checkpoints
from .data import PreferencePairs

ONLINE_DIR = "online_pairs"
ONLINE_FILE = re.compile(r"step-(\d{8})\.parquet")
DENOISER_COMPONENTS = ("unet", "transformer")


ONLINE_ONLY_FLAGS = (
    "online_prompts",
    "online_num_prompts",
    "online_num_samples",
    "online_sample_steps",
    "online_guidance_scale",
    "online_min_margin",
    "reward",
    "reward_model_path",
    "reward_processor_path",
    "reward_head_path",
)
"""Flags read only with ``--online_pairs_every``: one given without it is refused."""


def online_reward_options(config):
    """The ``RewardOptions`` of the trainer's ``--reward*`` flags (on the training device)."""
    from fastpref.pairs.rewards import RewardOptions

    return RewardOptions(
        model_path=config.reward_model_path,
        processor_path=config.reward_processor_path,
        head_path=config.reward_head_path,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def check_online(config, pairs: PreferencePairs) -> list[str] | None:
    """Before any write: the on-line prompts (None without ``--online_pairs_every``), the reward
    checked. ValueError naming the flag otherwise."""
    from fastpref.pairs.rewards import check_reward

    if config.online_pairs_every is None:
        parser = build_parser()
        given = [f"--{f}" for f in ONLINE_ONLY_FLAGS if getattr(config, f) != parser.get_default(f)]
        if given:
            raise ValueError(f"{', '.join(given)}: read only with --online_pairs_every N, which is not given")
        return None
    if config.online_prompts is not None:
        from fastpref.pairs.prompts import read_prompts

        prompts = read_prompts(config.online_prompts, argument="--online_prompts")
    else:
        prompts = list(pairs.captions)
    check_reward(config.reward, online_reward_options(config))
    return prompts[: config.online_num_prompts]


class OnlinePairs:
    """The refreshes of one run: ``pairs_at(step)`` gives the preference set in force at ``step``."""

    def __init__(self, config, family, dist, prompts: list[str], *, barrier, weight_dtype: torch.dtype):
        from fastpref.pairs.rewards import load_reward

        self.config, self.family, self.dist, self.prompts = config, family, dist, prompts
        self.every, self.barrier, self.weight_dtype = config.online_pairs_every, barrier, weight_dtype
        self.dir = Path(config.output_dir) / ONLINE_DIR
        self.reward = load_reward(config.reward, online_reward_options(config)) if dist.is_main else None
        self.pipe = None

    def refresh_step(self, step: int) -> int:
        """The step of the refresh whose set is in force at ``step``."""
        return step - step % self.every

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.parquet"

    def clear(self) -> None:
        """Rank 0, a run started afresh: drop the sets of an earlier run in this output directory."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def pipeline(self):
        """The directory's pipeline with the trainer's live denoiser and frozen encoders (built once)."""
        if self.pipe is None:
            from fastpref.pairs.sampling import load_pipeline, quiet_loading

            quiet_loading()

            path = Path(self.config.pretrained_model_name_or_path)
            index = json.loads((path / "model_index.json").read_text())
            components = {
                name: getattr(self.family, name)
                for name in index
                if not name.startswith("_") and getattr(self.family, name, None) is not None
            }
            for name in DENOISER_COMPONENTS:
                if name in index:
                    components[name] = self.family.denoiser
            self.pipe = load_pipeline(path, self.family.device, **components)
        return self.pipe

    def generate(self, step: int) -> dict[str, float]:
        """Rank 0: sample, score and pair with the current policy; write ``path(step)``."""
        from fastpref.pairs.generate import SamplingSettings, score_and_pair, seed_grid
        from fastpref.pairs.writer import ImagePairsFormat, write_atomic

        start = time.perf_counter()
        config, denoiser = self.config, self.family.denoiser
        fmt = ImagePairsFormat("jpeg")
        training = denoiser.training
        denoiser.eval()
        autocast = (
            torch.autocast(self.family.device.type, dtype=self.weight_dtype)
            if config.mixed_precision != "no"
            else nullcontext()
        )
        try:
            with autocast:
                rows, scores = score_and_pair(
                    self.pipeline(),
                    self.reward,
                    self.prompts,
                    list(range(len(self.prompts))),
                    seed_grid(config.seed, list(range(len(self.prompts))), config.online_num_samples),
                    fmt=fmt,
                    sampling=SamplingSettings(
                        config.online_sample_steps, config.online_guidance_scale, config.resolution, "auto"
                    ),
                    min_margin=config.online_min_margin,
                    batch_size=max(1, config.train_batch_size * 2),
                )
        finally:
            denoiser.train(training)
        if not rows["caption"]:
            raise ValueError(
                f"--online_pairs_every: the refresh at step {step} made no pair whose reward margin exceeds "
                f"--online_min_margin {config.online_min_margin:g}; lower it or raise --online_num_samples"
            )
        reward_mean = float(scores.mean())  # host-ok: numpy, between steps
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(fmt.table(rows), self.path(step), {"step": step, "reward_mean": reward_mean})
        return {
            "online_reward": reward_mean,
            "online_pairs": float(len(rows["caption"])),
            "online_refresh_s": time.perf_counter() - start,
        }

    def check_resume(self, step: int) -> None:
        """Before any write: a resume at ``step`` needs the set of its refresh step (unless that
        is ``step`` itself, whose set is made again from the checkpoint's policy)."""
        refresh = self.refresh_step(step)
        if refresh != step and not self.path(refresh).is_file():
            raise ValueError(
                f"--resume_from_checkpoint: the on-line pairs of step {refresh} ({str(self.path(refresh))!r}), in "
                f"force at the resumed step {step}, are missing; resume from a checkpoint at a multiple of "
                f"--online_pairs_every {self.every}, or start afresh"
            )

    def pairs_at(self, step: int) -> tuple[PreferencePairs, dict[str, float]]:
        """The set in force at ``step`` (a multiple of N: made now unless already written) and
        the metrics to log at ``step`` (empty when the set was read back)."""
        refresh = self.refresh_step(step)
        path, values = self.path(refresh), {}
        if self.dist.is_main and not path.is_file():
            self.check_resume(step)
            values = self.generate(step)
            self.prune(step)
        self.barrier()
        return PreferencePairs([path], "--online_pairs_every"), values

    def prune(self, step: int) -> None:
        """Rank 0: remove the sets that neither ``step`` nor an existing checkpoint needs."""
        keep = {step} | {self.refresh_step(int(c.name.split("-")[1])) for c in list_checkpoints(self.config.output_dir)}
        for file in self.dir.glob("step-*.parquet"):
            match = ONLINE_FILE.fullmatch(file.name)
            if match and int(match[1]) not in keep:
                file.unlink()
