"""Pick-a-Pic-layout preference pairs: loading, tie dropping, winner-first ordering, transforms.

A preference file is a parquet table with columns ``jpg_0``, ``jpg_1`` (encoded image bytes),
``label_0`` (1 when image 0 is preferred, 0 when image 1 is, 0.5 for a tie) and ``caption``.
"""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")


def parquet_files(path: str | Path, argument: str = "--train_data_dir") -> list[Path]:
    """The parquet file ``path`` or the sorted ``*.parquet`` files of directory ``path``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"{argument}: expected a parquet file or a directory of *.parquet files, "
                             f"got directory {str(path)!r} with no *.parquet file")
        return files
    if not path.is_file():
        raise ValueError(f"{argument}: expected a local parquet file or a directory of them "
                         f"(hub names are not fetched; download the dataset first), "
                         f"got {str(path)!r}, which does not exist")
    return [path]


class PreferencePairs:
    """Non-tied pairs of a Pick-a-Pic table, winner first.

    ``pairs[i]`` is ``(caption, winner_bytes, loser_bytes)``; images stay encoded until a batch
    asks for them (``load_pixels``).
    """

    def __init__(self, files: list[Path], argument: str = "--train_data_dir"):
        captions, winners, losers = [], [], []
        self.num_ties = 0
        for file in files:
            try:
                table = pq.read_table(file)
            except Exception as error:  # pyarrow raises several types for a malformed file
                raise ValueError(f"{argument}: could not read {str(file)!r} as parquet "
                                 f"({type(error).__name__}: {error})") from error
            missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
            if missing:
                raise ValueError(f"{argument}: {str(file)!r} lacks columns {missing}; expected the "
                                 f"Pick-a-Pic columns {list(REQUIRED_COLUMNS)}, got {table.column_names}")
            labels = np.asarray(table.column("label_0").to_pylist(), dtype=np.float64)
            jpg_0, jpg_1 = table.column("jpg_0").to_pylist(), table.column("jpg_1").to_pylist()
            for caption, label, image_0, image_1 in zip(table.column("caption").to_pylist(), labels, jpg_0, jpg_1):
                if label == 0.5:
                    self.num_ties += 1
                    continue
                if label not in (0.0, 1.0):
                    raise ValueError(f"{argument}: label_0 must be 0, 0.5 or 1, got {label} in {str(file)!r}")
                captions.append(caption)
                winners.append(image_0 if label == 1.0 else image_1)
                losers.append(image_1 if label == 1.0 else image_0)
        if not captions:
            raise ValueError(f"{argument}: no non-tied preference pair in {[str(f) for f in files]}")
        self.captions, self.winners, self.losers = captions, winners, losers

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[str, bytes, bytes]:
        return self.captions[index], self.winners[index], self.losers[index]

    def image(self, index: int) -> tuple[str, bytes, bool]:
        """Image ``index`` of the unpaired view (``2 * len(self)`` images, for KTO):
        ``(caption, image_bytes, desirable)``; even indices are winners, odd ones losers."""
        pair, which = divmod(index, 2)
        return self.captions[pair], (self.winners, self.losers)[which][pair], which == 0


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes to ``[3, H, W]`` float32 in [-1, 1]."""
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def load_pixels(images: list[bytes], resolution: int, *, random_crop: bool, hflip: bool,
                generator: torch.Generator) -> list[torch.Tensor]:
    """Images resized (shorter side) to the first one's size, cropped and flipped identically.

    Returns ``[3, resolution, resolution]`` float32 tensors in [-1, 1], one per image. The crop
    offset and the flip come from ``generator`` so a run is reproducible step by step.
    """
    decoded = []
    for data in images:
        image = decode_image(data)[None]
        h, w = image.shape[-2:]
        scale = resolution / min(h, w)
        size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        decoded.append(image[0])
    h, w = decoded[0].shape[-2:]
    decoded = [d if d.shape[-2:] == (h, w) else
               F.interpolate(d[None], size=(h, w), mode="bilinear", antialias=True)[0] for d in decoded]
    offsets = torch.randint(0, 2**31 - 1, (2,), generator=generator)
    if random_crop:
        top, left = int(offsets[0]) % (h - resolution + 1), int(offsets[1]) % (w - resolution + 1)
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    flip = bool(torch.rand((), generator=generator) < 0.5) and hflip
    out = []
    for image in decoded:
        image = image[:, top:top + resolution, left:left + resolution]
        out.append(image.flip(-1) if flip else image)
    return out


def pair_indices(position: int, count: int, num_pairs: int, seed: int) -> list[int]:
    """Indices of ``count`` pairs starting at global ``position`` of the shuffled stream.

    The stream is the concatenation of per-epoch permutations seeded by ``(seed, epoch)``, so
    any position can be reproduced without iterator state (exact resume).
    """
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, num_pairs)
        perm = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(count - len(out), num_pairs - offset)
        out.extend(perm[offset:offset + take].tolist())
        position += take
    return out
