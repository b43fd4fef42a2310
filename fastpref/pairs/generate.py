"""Sample, score and pair: the loop of ``fastpref-pairs`` (and of the trainer's on-line pairs).

For prompt ``p`` of the prompts file, sample ``k`` (``0..K-1``) is drawn from seed
``sample_seed(seed, p, k)``, so any prompt's samples can be regenerated alone, whatever the
other prompts, K or the batching. Each image is encoded as it will be stored and scored as the
trainer will read it (decoded back), and ``select.select_pairs`` picks the pairs of each prompt.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .rewards import Reward
from .sampling import sample_images
from .select import label_0, select_pairs
from .writer import ImagePairsFormat, PartStore


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampling seed of sample ``sample_index`` of prompt ``prompt_index`` under run ``seed``:
    a 32-bit word of numpy's ``SeedSequence([seed, prompt_index, sample_index])`` (stable
    across numpy versions and platforms)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1)[0])


def seed_grid(seed: int, prompt_indices: list[int], num_samples: int) -> np.ndarray:
    """``[P, K]`` int64 seeds of ``prompt_indices`` x samples ``0..K-1``."""
    return np.array([[sample_seed(seed, p, k) for k in range(num_samples)] for p in prompt_indices], dtype=np.int64)


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of the prompts (one a line), recorded so a resume with other prompts is refused."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


@dataclass(frozen=True)
class SamplingSettings:
    """How each image is sampled (``sampling.sample_images``'s settings)."""

    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    resolution: int | None = None
    scheduler: str = "auto"


def score_and_pair(
    pipe,
    reward: Reward,
    prompts: list[str],
    prompt_indices: list[int],
    seeds: np.ndarray,
    *,
    fmt: ImagePairsFormat,
    sampling: SamplingSettings = SamplingSettings(),
    pairing: str = "best_worst",
    min_margin: float | None = 0.0,
    batch_size: int = 32,
    progress=None,
) -> tuple[dict[str, list], np.ndarray]:
    """Rows of the pairs of ``prompts`` (``prompt_indices``: their lines in the prompts file),
    each sampled with its row of ``seeds`` (``[P, K]``), and the ``[P, K]`` float64 rewards of
    all samples. Rows are in prompt order, then pair order; columns are ``fmt.SCHEMA``'s."""
    num_prompts, num_samples = seeds.shape
    if num_prompts != len(prompts) or len(prompt_indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(prompt_indices)} indices, seeds {seeds.shape}")
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    images = sample_images(
        pipe,
        flat_prompts,
        seeds.reshape(-1).tolist(),  # host-ok: offline sampling tool, host seeds for the generators
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        resolution=sampling.resolution,
        scheduler=sampling.scheduler,
        batch_size=batch_size,
        progress=progress,
    )
    blobs = [fmt.encode(image) for image in images]
    scores = reward(fmt.decode(blobs), flat_prompts).reshape(num_prompts, num_samples)
    rows: dict[str, list] = {f.name: [] for f in fmt.SCHEMA}
    for i, (prompt, index) in enumerate(zip(prompts, prompt_indices, strict=True)):
        for a, b in select_pairs(scores[i], pairing, min_margin):
            rows["jpg_0"].append(blobs[i * num_samples + a])
            rows["jpg_1"].append(blobs[i * num_samples + b])
            rows["label_0"].append(label_0(scores[i, a], scores[i, b]))
            rows["caption"].append(prompt)
            rows["score_0"].append(float(scores[i, a]))
            rows["score_1"].append(float(scores[i, b]))
            rows["seed_0"].append(int(seeds[i, a]))
            rows["seed_1"].append(int(seeds[i, b]))
            rows["prompt_index"].append(int(index))
    return rows, scores


@dataclass(frozen=True)
class PairsJob:
    """One ``fastpref-pairs`` run: what it makes (``spec``) and how (batching, part size)."""

    model: str
    prompts: tuple[str, ...]
    lora_weights: str | None = None
    num_samples: int = 4
    seed: int = 0
    reward: str = "colourfulness"
    reward_model_path: str | None = None
    reward_head_path: str | None = None
    pairing: str = "best_worst"
    min_margin: float = 0.0
    image_format: str = "jpeg"
    sampling: SamplingSettings = SamplingSettings()
    part_size: int = 64
    batch_size: int = 32
    media: str = "images"  # the pipeline's: "images" (Pick-a-Pic parquet) or "videos" (the video index)
    num_frames: int | None = None  # videos: frames per clip

    def spec(self) -> dict:
        """What determines the output (stored in it and in the parts directory; a resume must match)."""
        return {
            "format": "fastpref-pairs/1",
            "model": str(Path(self.model).resolve()),
            "lora_weights": self.lora_weights and str(Path(self.lora_weights).resolve()),
            "num_prompts": len(self.prompts),
            "prompts_sha256": prompts_digest(list(self.prompts)),
            "num_samples": self.num_samples,
            "seed": self.seed,
            "reward": self.reward,
            "reward_model_path": self.reward_model_path and str(Path(self.reward_model_path).resolve()),
            "reward_head_path": self.reward_head_path and str(Path(self.reward_head_path).resolve()),
            "pairing": self.pairing,
            "min_margin": self.min_margin,
            "image_format": self.image_format,
            **asdict(self.sampling),
            "part_size": self.part_size,
            **({"media": self.media, "num_frames": self.num_frames} if self.media == "videos" else {}),
        }

    def chunks(self) -> list[tuple[int, int]]:
        """``(first, end)`` prompt ranges of the part files."""
        n = len(self.prompts)
        return [(first, min(first + self.part_size, n)) for first in range(0, n, self.part_size)]


def run_job(job: PairsJob, pipe, reward: Reward, output: str | Path, *, overwrite: bool = False, progress: bool = True):
    """Make ``output`` for ``job`` with the loaded ``pipe`` and ``reward``, resuming a killed
    run's parts (``writer.PartStore``). Returns ``(table, summary)``; ``summary`` holds the
    number of pairs, prompts done now and before, and the mean reward of the samples made now."""
    from tqdm.auto import tqdm

    store = PartStore(output, job.spec())
    state = store.check(overwrite)
    if job.media == "videos":
        from .video import VideoPairsFormat, score_and_pair_videos

        fmt = VideoPairsFormat(output)
        pair = partial(score_and_pair_videos, num_frames=job.num_frames)
    else:
        fmt, pair = ImagePairsFormat(job.image_format), score_and_pair
    if state == "done":  # a kill between the final rename and the parts' removal leaves them: removed
        import shutil

        import pyarrow.parquet as pq

        shutil.rmtree(store.parts, ignore_errors=True)

        table = pq.read_table(store.output)
        return table, {
            "pairs": table.num_rows,
            "prompts_now": 0,
            "prompts_before": len(job.prompts),
            "reward_mean": None,
        }
    store.start(overwrite)
    if hasattr(fmt, "prepare"):  # videos: the clips folder
        fmt.prepare(overwrite)
    chunks, done = job.chunks(), store.done()
    before = sum(end - first for first, end in chunks if (first, end) in done)
    bar = tqdm(
        total=len(job.prompts) * job.num_samples,
        initial=before * job.num_samples,
        unit="video" if job.media == "videos" else "image",
        desc="fastpref-pairs",
        disable=not progress,
    )
    total, count = 0.0, 0
    for first, end in chunks:
        if (first, end) in done:
            continue
        indices = list(range(first, end))
        rows, scores = pair(
            pipe,
            reward,
            list(job.prompts[first:end]),
            indices,
            seed_grid(job.seed, indices, job.num_samples),
            fmt=fmt,
            sampling=job.sampling,
            pairing=job.pairing,
            min_margin=job.min_margin,
            batch_size=job.batch_size,
            progress=bar.update,
        )
        store.write_part(first, end, fmt.table(rows))
        total, count = total + float(scores.sum()), count + scores.size
        bar.set_postfix(reward=f"{total / count:.4f}")
    bar.close()
    table = store.finish(chunks, fmt.SCHEMA)
    return table, {
        "pairs": table.num_rows,
        "prompts_now": len(job.prompts) - before,
        "prompts_before": before,
        "reward_mean": total / count if count else None,
    }
