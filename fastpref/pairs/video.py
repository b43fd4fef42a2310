"""Video pairs for ``fastpref-pairs``: the video index the trainer's video families read.

For a text-to-video pipeline (a family with ``media == "videos"``, e.g. ``WanPipeline``) the
output is the index of ``fastpref.training.video_data``: a parquet with ``video_0``, ``video_1``
(mp4 paths relative to the index file's directory), ``label_0``, ``caption``, and for audit and
regeneration ``score_0``, ``score_1``, ``seed_0``, ``seed_1``, ``prompt_index``. The clips lie in
``<output>.videos/``, one ``p<prompt>_k<sample>.mp4`` per paired sample (H.264, ``crf`` 10),
each written under a temporary name and renamed into place; a sample in no pair is deleted. The
reward scores each clip as the trainer reads it: decoded back from its mp4 file. Resuming works
as for images (``writer.PartStore``): a part's clips are rewritten, identical, when its part file
was not written before a kill; the index only ever names clips that are whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from .rewards import Reward
from .sampling import sample_videos
from .select import label_0, select_pairs
from .writer import FORMATS, PAIR_FIELDS

WAN_NUM_FRAMES = 81  # WanPipeline.__call__'s default num_frames


def default_num_frames(path: str | Path) -> int:
    """Frames per sampled clip when ``--num_frames`` is not given: the bundled tiny Wan
    pipeline's clip length (9) for it, else ``WanPipeline``'s default 81."""
    from fastpref.tiny.motion import NUM_FRAMES
    from fastpref.training.bundled import BUNDLED_PIPELINES

    tiny = BUNDLED_PIPELINES.get("wan")
    return NUM_FRAMES if tiny is not None and Path(path).resolve() == tiny.resolve() else WAN_NUM_FRAMES


def default_resolution(path: str | Path) -> int | None:
    """The clip side when ``--resolution`` is not given: 32 for the bundled tiny Wan pipeline,
    else None (the pipeline's own height and width, 480 x 832 for Wan)."""
    from fastpref.tiny.motion import SIZE
    from fastpref.training.bundled import BUNDLED_PIPELINES

    tiny = BUNDLED_PIPELINES.get("wan")
    return SIZE if tiny is not None and Path(path).resolve() == tiny.resolve() else None


class VideoPairsFormat:
    """The video index (module docstring) of an output parquet ``output``."""

    kind = "video"
    SCHEMA = pa.schema([("video_0", pa.string()), ("video_1", pa.string()), *PAIR_FIELDS])

    def __init__(self, output: str | Path, fps: int = 8, crf: int = 10):
        self.root = Path(output).parent
        self.folder = Path(output).name + ".videos"
        self.fps, self.crf = fps, crf

    def prepare(self, overwrite: bool = False) -> None:
        """Create the clips folder (``overwrite``: empty it first); remove temporary files a
        killed run left."""
        folder = self.root / self.folder
        if overwrite:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".tmp-*"):
            leftover.unlink()

    def relative(self, prompt_index: int, sample: int) -> str:
        """The index's path of sample ``sample`` of prompt ``prompt_index``."""
        return f"{self.folder}/p{prompt_index:08d}_k{sample:02d}.mp4"

    def encode(self, clip: np.ndarray, relative: str) -> str:
        """Write ``[F, H, W, 3]`` uint8 ``clip`` to ``relative`` atomically; returns ``relative``."""
        from fastpref.training.video_data import write_video

        path = self.root / relative
        tmp = path.with_name(f".tmp-{path.name}")
        write_video(tmp, clip, fps=self.fps, crf=self.crf)
        os.replace(tmp, path)
        return relative

    def decode(self, relatives: list[str], num_frames: int) -> np.ndarray:
        """The written clips as the trainer reads them: ``[N, F, H, W, 3]`` uint8."""
        from fastpref.training.video_data import read_video

        clips = [read_video(str(self.root / r), num_frames) for r in relatives]  # [3, F, H, W] in [-1, 1]
        return np.stack([((c.permute(1, 2, 3, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8) for c in clips])

    def remove(self, relatives: list[str]) -> None:
        """Delete clips that are in no pair."""
        for r in relatives:
            (self.root / r).unlink(missing_ok=True)

    def table(self, rows: dict[str, list]) -> pa.Table:
        """The rows (column -> values, ``SCHEMA``'s columns) as a table of ``SCHEMA``."""
        return pa.table({f.name: pa.array(rows[f.name], f.type) for f in self.SCHEMA}, schema=self.SCHEMA)


def score_and_pair_videos(
    pipe,
    reward: Reward,
    prompts: list[str],
    prompt_indices: list[int],
    seeds: np.ndarray,
    *,
    fmt: VideoPairsFormat,
    num_frames: int,
    sampling,
    pairing: str = "best_worst",
    min_margin: float | None = 0.0,
    batch_size: int = 32,
    progress=None,
) -> tuple[dict[str, list], np.ndarray]:
    """As ``generate.score_and_pair`` for clips: rows of the pairs of ``prompts`` (their lines
    ``prompt_indices``), sample ``k`` of prompt ``i`` drawn from ``seeds[i, k]`` (``[P, K]``),
    and the ``[P, K]`` float64 rewards of the clips as written. Columns are ``fmt.SCHEMA``'s."""
    num_prompts, num_samples = seeds.shape
    if num_prompts != len(prompts) or len(prompt_indices) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(prompt_indices)} indices, seeds {seeds.shape}")
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    clips = sample_videos(
        pipe,
        flat_prompts,
        seeds.reshape(-1).tolist(),  # host-ok: offline sampling tool, host seeds for the generators
        num_frames=num_frames,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        resolution=sampling.resolution,
        batch_size=batch_size,
        progress=progress,
    )
    paths = [fmt.relative(index, k) for index in prompt_indices for k in range(num_samples)]
    for clip, path in zip(clips, paths, strict=True):
        fmt.encode(clip, path)
    scores = reward(fmt.decode(paths, num_frames), flat_prompts).reshape(num_prompts, num_samples)
    rows: dict[str, list] = {f.name: [] for f in fmt.SCHEMA}
    used = set()
    for i, (prompt, index) in enumerate(zip(prompts, prompt_indices, strict=True)):
        for a, b in select_pairs(scores[i], pairing, min_margin):
            used.update((i * num_samples + a, i * num_samples + b))
            rows["video_0"].append(paths[i * num_samples + a])
            rows["video_1"].append(paths[i * num_samples + b])
            rows["label_0"].append(label_0(scores[i, a], scores[i, b]))
            rows["caption"].append(prompt)
            rows["score_0"].append(float(scores[i, a]))
            rows["score_1"].append(float(scores[i, b]))
            rows["seed_0"].append(int(seeds[i, a]))
            rows["seed_1"].append(int(seeds[i, b]))
            rows["prompt_index"].append(int(index))
    fmt.remove([p for n, p in enumerate(paths) if n not in used])
    return rows, scores


FORMATS["video"] = VideoPairsFormat
