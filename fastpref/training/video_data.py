"""Video preference pairs: an index table of video files, read with PyAV (the ``video`` extra).

An index is a parquet or CSV table with columns ``video_0``, ``video_1`` (paths of two video
files, relative to the index file's directory or absolute), ``label_0`` (1 when video 0 is
preferred, 0 when video 1 is, 0.5 for a tie) and ``caption``; ``--dataset_name`` names an index
file or a directory whose ``*.parquet`` and ``*.csv`` files are all indexes. Ties are dropped and
each pair is stored winner first, as for images (``fastpref.training.data``).

Frame sampling (docs/training.md, "Video data"): a clip is ``--num_frames`` frames ``0, s, 2s, ...,
(num_frames - 1) s`` of the decoded stream, ``s = --frame_stride``, counted from the first frame;
frames after the last one taken are not read. A video with fewer than ``(num_frames - 1) s + 1``
frames is an error naming the file, the row, the column, and both counts. ``--num_frames``
defaults to the frame count of the first row's ``video_0`` and ``--resolution`` to its shorter
side. Every frame of a pair is resized (shorter side), cropped and flipped alike.

Errors: a missing column, a non-string path or caption, a non-number label, or a video file that
does not exist is a ValueError naming the file, row and column when the index is read; a video
that does not decode or is too short is one when a batch reads it, or, with ``skip_bad_rows``,
every video is decoded once at start and the failing rows are dropped (``skipped``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

VIDEO_COLUMNS = ("video_0", "video_1", "label_0", "caption")
INDEX_SUFFIXES = (".parquet", ".csv")


def _video_library():
    """PyAV, or a ValueError saying how to install it."""
    try:
        import av
    except ImportError as error:
        raise ValueError("video data needs PyAV: pip install 'fastpref[video]' (or pip install av)") from error
    return av


class VideoFile(str):
    """A video file's path that knows where it came from (``origin``: index file, row and
    column), so a decoding error can name them."""

    origin: str = ""

    @classmethod
    def at(cls, path: Path, file: Path, row: int, column: str, argument: str) -> VideoFile:
        out = cls(str(path))
        out.origin = f"{argument}: {str(file)!r} row {row} column {column!r} ({str(path)!r})"
        return out


def index_files(path: str | Path, argument: str = "--dataset_name") -> list[Path]:
    """The index file ``path`` (``.parquet`` or ``.csv``) or the sorted index files of directory
    ``path``; ValueError naming ``argument`` otherwise."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in INDEX_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(
                f"{argument}: expected a video index (.parquet or .csv) or a directory of them, got directory "
                f"{str(path)!r} with none"
            )
        return files
    if not path.is_file():
        raise ValueError(
            f"{argument}: expected a local video index file (.parquet or .csv), got {str(path)!r}, which does not exist"
        )
    if path.suffix not in INDEX_SUFFIXES:
        raise ValueError(f"{argument}: expected a video index ending in .parquet or .csv, got {str(path)!r}")
    return [path]


def _read_table(file: Path, argument: str) -> pa.Table:
    try:
        if file.suffix == ".csv":
            import pyarrow.csv as pv

            # paths and captions as text whatever they look like; the label as a number
            names = {c: pa.string() for c in ("video_0", "video_1", "caption")}
            return pv.read_csv(file, convert_options=pv.ConvertOptions(column_types=names))
        import pyarrow.parquet as pq

        return pq.read_table(file)
    except Exception as error:  # pyarrow raises several types for a malformed file
        raise ValueError(
            f"{argument}: could not read {str(file)!r} as a {file.suffix[1:]} video index "
            f"({type(error).__name__}: {error})"
        ) from error


def _check_column(file: Path, name: str, values: list, ok, expected: str, argument: str) -> None:
    row = next((i for i, v in enumerate(values) if not ok(v)), None)
    if row is not None:
        raise ValueError(
            f"{argument}: {str(file)!r} column {name!r} must hold {expected}; first bad row {row}: {values[row]!r:.80}"
        )


def _decoded_frames(path: str, where: str):
    """The decoded frames of the first video stream of ``path`` (PyAV ``VideoFrame``s, in
    presentation order); ValueError naming ``where`` when the file does not open, holds no video
    stream or fails to decode."""
    av = _video_library()
    hint = "fix or drop the row, or pass --skip_bad_rows to drop such rows at start"
    try:
        container = av.open(str(path))
    except Exception as error:  # PyAV raises FFmpegError subclasses (some are ValueErrors) and OSError
        raise ValueError(f"{where} does not decode as a video ({type(error).__name__}: {error}); {hint}") from error
    with container:
        if not container.streams.video:
            raise ValueError(f"{where} holds no video stream; {hint}")
        frames = container.decode(video=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except Exception as error:  # as above
                raise ValueError(
                    f"{where} does not decode as a video ({type(error).__name__}: {error}); {hint}"
                ) from error
            yield frame


def read_video(path: str, num_frames: int, frame_stride: int = 1) -> torch.Tensor:
    """Frames ``0, s, ..., (num_frames - 1) s`` (``s = frame_stride``) of the video file ``path``
    as ``[3, num_frames, H, W]`` float32 in [-1, 1]. ValueError naming the file (its index row and
    column for a ``VideoFile``) when it does not decode, holds no video stream, or has fewer than
    ``(num_frames - 1) s + 1`` frames."""
    where = getattr(path, "origin", "") or repr(str(path))
    needed = (num_frames - 1) * frame_stride + 1
    frames, count = [], 0
    for frame in _decoded_frames(path, where):
        if count % frame_stride == 0:
            frames.append(frame.to_ndarray(format="rgb24"))
        count += 1
        if count >= needed:
            break
    if count < needed:
        raise ValueError(
            f"{where} has {count} frames; --num_frames {num_frames} with --frame_stride {frame_stride} needs at "
            f"least {needed} (frames 0, {frame_stride}, ..., {needed - 1}); pass a smaller --num_frames or "
            f"--frame_stride, or --skip_bad_rows to drop such rows at start"
        )
    array = np.stack(frames).astype(np.float32)  # [F, H, W, 3]
    return torch.from_numpy(array).permute(3, 0, 1, 2) / 127.5 - 1.0


def probe_video(path: str) -> tuple[int, int, int]:
    """``(frames, height, width)`` of the video file ``path``, every frame decoded to count them
    (container metadata is often absent or wrong). ValueError naming the file when it does not
    decode."""
    where = getattr(path, "origin", "") or repr(str(path))
    count, size = 0, (0, 0)
    for frame in _decoded_frames(path, where):
        count, size = count + 1, (frame.height, frame.width)
    if count == 0:
        raise ValueError(f"{where} holds no frame")
    return count, *size


class VideoPreferencePairs:
    """Non-tied pairs of video index tables, winner first.

    ``pairs[i]`` is ``(caption, winner, loser)`` with ``VideoFile`` paths; ``image(i)`` is the
    unpaired view (KTO). ``num_frames`` and ``resolution`` are the clip length and size to train
    at (given, or from the first row's ``video_0``), ``check_num_frames(n)`` the family's check of
    the clip length; videos stay on disk until a batch reads them (``load_video_pixels``)."""

    def __init__(
        self,
        files: list[Path],
        argument: str = "--dataset_name",
        *,
        num_frames: int | None = None,
        frame_stride: int = 1,
        skip_bad_rows: bool = False,
        check_num_frames=None,
    ):
        self.num_ties = 0
        self.skipped: list[dict] = []  # skip_bad_rows: {"file", "row", "column", "reason"} of each dropped row
        self.frame_stride = frame_stride
        rows = []  # (file, row, label, caption, video_0, video_1) of every row whose files exist
        for file in files:
            rows.extend(self._read_index(file, argument, skip_bad_rows))
        if not rows:
            raise ValueError(
                f"{argument}: no row with existing video files in {[str(f) for f in files]}"
                + (f" ({len(self.skipped)} bad rows skipped)" if self.skipped else "")
            )
        frames, height, width = probe_video(rows[0][4])
        self.num_frames = num_frames or frames
        if check_num_frames is not None:  # the family's rule (Wan: 1 + 4k), before any other video is read
            check_num_frames(self.num_frames)
        needed = (self.num_frames - 1) * frame_stride + 1
        if frames < needed:  # the first video already too short: say so now, not at the first batch
            raise ValueError(
                f"{rows[0][4].origin} has {frames} frames; --num_frames {self.num_frames} with --frame_stride "
                f"{frame_stride} needs at least {needed}; pass a smaller --num_frames or --frame_stride"
            )
        self.resolution = min(height, width)
        self.captions, self.winners, self.losers = [], [], []
        for file, row, label, caption, video_0, video_1 in rows:
            if label == 0.5:
                self.num_ties += 1
                continue
            if skip_bad_rows and self._skip_undecodable(file, row, video_0, video_1):
                continue
            self.captions.append(caption)
            self.winners.append(video_0 if label == 1.0 else video_1)
            self.losers.append(video_1 if label == 1.0 else video_0)
        if not self.captions:
            raise ValueError(
                f"{argument}: no non-tied preference pair in {[str(f) for f in files]}"
                + (f" ({len(self.skipped)} bad rows skipped)" if self.skipped else "")
            )

    def _read_index(self, file: Path, argument: str, skip_bad_rows: bool) -> list[tuple]:
        """The rows of one index file, checked (columns, types, labels, files that exist)."""
        table = _read_table(file, argument)
        missing = [c for c in VIDEO_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(
                f"{argument}: {str(file)!r} lacks columns {missing}; a video index has the columns "
                f"{list(VIDEO_COLUMNS)}, got {table.column_names}"
                + (
                    " (an image preference set: this pipeline trains on videos)"
                    if "jpg_0" in table.column_names
                    else ""
                )
            )
        columns = {c: table.column(c).to_pylist() for c in VIDEO_COLUMNS}
        for name in ("video_0", "video_1", "caption"):
            _check_column(file, name, columns[name], lambda v: isinstance(v, str), "strings", argument)
        _check_column(
            file,
            "label_0",
            columns["label_0"],
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            "numbers",
            argument,
        )
        out = []
        for row, (video_0, video_1, label, caption) in enumerate(zip(*columns.values(), strict=True)):
            label = float(label)
            if label not in (0.0, 0.5, 1.0):
                raise ValueError(f"{argument}: label_0 must be 0, 0.5 or 1, got {label} in {str(file)!r} row {row}")
            paths = {
                c: VideoFile.at(file.parent / v, file, row, c, argument)
                for c, v in (("video_0", video_0), ("video_1", video_1))
            }
            absent = next((c for c, p in paths.items() if not Path(p).is_file()), None)
            if absent is not None:
                if not skip_bad_rows:
                    raise ValueError(f"{paths[absent].origin}: no such file (--skip_bad_rows drops such rows at start)")
                self.skipped.append({"file": str(file), "row": row, "column": absent, "reason": "no such file"})
                continue
            out.append((file, row, label, caption, paths["video_0"], paths["video_1"]))
        return out

    def _skip_undecodable(self, file: Path, row: int, *videos: VideoFile) -> bool:
        """``skip_bad_rows``: record and report the row when one of its videos does not yield a
        full clip."""
        for column, video in zip(("video_0", "video_1"), videos, strict=True):
            try:
                read_video(video, self.num_frames, self.frame_stride)
            except ValueError as error:
                reason = str(error).replace(video.origin, "").strip(" ;")
                self.skipped.append({"file": str(file), "row": row, "column": column, "reason": reason})
                return True
        return False

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, VideoFile, VideoFile]:
        return self.captions[index], self.winners[index], self.losers[index]

    def image(self, index: int) -> tuple[str, VideoFile, bool]:
        """Video ``index`` of the unpaired view (``2 * len(self)`` videos, for KTO):
        ``(caption, video, desirable)``; even indices are winners, odd ones losers."""
        pair, which = divmod(index, 2)
        return self.captions[pair], (self.winners, self.losers)[which][pair], which == 0


def _resize_frames(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[3, F, H, W]`` resized to ``size`` frame by frame (bilinear, antialiased)."""
    if tuple(video.shape[-2:]) == size:
        return video
    frames = F.interpolate(video.transpose(0, 1), size=size, mode="bilinear", antialias=True, align_corners=False)
    return frames.transpose(0, 1)


def load_video_pixels(
    videos: list[str],
    resolution: int,
    *,
    num_frames: int,
    frame_stride: int,
    random_crop: bool,
    hflip: bool,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Clips of ``videos`` (``read_video``) resized (shorter side to ``resolution``) to the first
    one's size, cropped and flipped identically (every frame and every video of the item alike).

    Returns ``[3, num_frames, resolution, resolution]`` float32 tensors in [-1, 1], one per video.
    The crop offset and the flip come from ``generator`` (two integers, then one uniform, as the
    image path draws them), so a run is reproducible step by step."""
    decoded = []
    for path in videos:
        video = read_video(path, num_frames, frame_stride)
        h, w = video.shape[-2:]
        scale = resolution / min(h, w)
        decoded.append(_resize_frames(video, (max(resolution, round(h * scale)), max(resolution, round(w * scale)))))
    h, w = decoded[0].shape[-2:]
    decoded = [_resize_frames(d, (h, w)) for d in decoded]
    offsets = torch.randint(0, 2**31 - 1, (2,), generator=generator)
    if random_crop:
        top, left = int(offsets[0]) % (h - resolution + 1), int(offsets[1]) % (w - resolution + 1)
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    flip = bool(torch.rand((), generator=generator) < 0.5) and hflip
    out = []
    for video in decoded:
        video = video[..., top : top + resolution, left : left + resolution]
        out.append(video.flip(-1) if flip else video)
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 10) -> None:
    """``[F, H, W, 3]`` uint8 frames as an H.264 mp4 (yuv420p, ``crf``; even ``H`` and ``W``)."""
    av = _video_library()
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be [F, H, W, 3] uint8 with even H and W, got shape {frames.shape}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video_pairs(config, family) -> tuple[VideoPreferencePairs, object]:
    """The trainer's video data (``fastpref.training.validation.validate`` for a family with ``media ==
    "videos"``): the pairs of ``config.data_path`` and ``config`` with ``num_frames`` filled in
    (given, or the first row's ``video_0``'s frame count) and ``resolution`` defaulting to that
    video's shorter side. The family checks the clip length (``check_num_frames``) before any
    video beyond the first is decoded."""
    path = config.pretrained_model_name_or_path
    if config.num_frames is not None:
        family.check_num_frames(path, config.num_frames)
    pairs = VideoPreferencePairs(
        index_files(config.data_path, config.data_argument),
        config.data_argument,
        num_frames=config.num_frames,
        frame_stride=config.frame_stride or 1,
        skip_bad_rows=config.skip_bad_rows,
        check_num_frames=lambda n: family.check_num_frames(path, n),
    )
    return pairs, config.replace(num_frames=pairs.num_frames, resolution=config.resolution or pairs.resolution)
