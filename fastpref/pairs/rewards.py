"""The reward interface and its registry.

A reward is any callable ``reward(images, prompts) -> scores``: ``images`` ``[N, H, W, 3]``
uint8 (the images as stored in the preference file; for a video pipeline ``[N, F, H, W, 3]``
clips as decoded from the stored mp4 files), ``prompts`` ``N`` strings, ``scores`` ``[N]``
numbers, higher is better. Each registered reward scores one medium (``media``: ``"images"``
or ``"videos"``); a ``module:callable`` gets what the pipeline makes. ``load_reward`` resolves
``--reward``:

- a registered name (``REWARDS``: the bundled programmatic rewards and the model-based scorers
  registered by ``clip_rewards`` and ``imagereward``), built from ``RewardOptions`` (the local
  weight paths and the device);
- ``module:callable`` (``module:attr.attr`` too), imported and called as is.

Every model-based reward reads weights from local disk only and refuses, with a ValueError
naming the flag and what it expects, when they are absent (``check_reward``, called before any
work); nothing is downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastpref.tiny.motion_reward import motion_speed
from fastpref.tiny.reward import colourfulness

RewardFn = Callable[[np.ndarray, list[str]], np.ndarray]
MEDIA_NDIM = {"images": 4, "videos": 5}  # images [N, H, W, 3]; videos [N, F, H, W, 3]
DEFAULT_REWARDS = {"images": "colourfulness", "videos": "motion_speed"}
"""The bundled reward ``fastpref-pairs`` uses when ``--reward`` is not given, per medium."""


@dataclass(frozen=True)
class RewardOptions:
    """What a model-based reward is built from: ``model_path`` (``--reward_model_path``, a local
    model directory), ``processor_path`` (``--reward_processor_path``, its processor; default
    the model's), ``head_path`` (``--reward_head_path``, a scoring head's weights file),
    ``device`` (where the model runs) and ``batch_size`` (images per forward pass)."""

    model_path: str | None = None
    processor_path: str | None = None
    head_path: str | None = None
    device: str = "cpu"
    batch_size: int = 32


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: ``build(options) -> reward`` and ``check(options)``, which raises
    ValueError (naming the flag) when the reward cannot be built, without loading weights."""

    name: str
    description: str
    build: Callable[[RewardOptions], RewardFn]
    check: Callable[[RewardOptions], None]
    media: str = "images"


REWARDS: dict[str, RewardSpec] = {}


def _no_check(options: RewardOptions) -> None:
    """A reward that needs nothing (the programmatic ones)."""


def register_reward(
    name: str, description: str, check: Callable[[RewardOptions], None] = _no_check, media: str = "images"
):
    """Decorator: register ``build(options) -> reward`` as ``--reward name``, scoring ``media``."""

    def decorate(build: Callable[[RewardOptions], RewardFn]):
        if name in REWARDS:
            raise TypeError(f"reward {name!r} is already registered")
        REWARDS[name] = RewardSpec(name, description, build, check, media)
        return build

    return decorate


@register_reward("colourfulness", "the bundled tiny set's reward: mean chroma, max - min of R, G, B (fastpref.tiny)")
def _colourfulness(options: RewardOptions) -> RewardFn:
    return lambda images, prompts: colourfulness(images)


@register_reward(
    "motion_speed",
    "the bundled tiny video set's temporal reward: how fast the coloured shape moves, pixels per frame "
    "(fastpref.tiny.motion_reward)",
    media="videos",
)
def _motion_speed(options: RewardOptions) -> RewardFn:
    return lambda videos, prompts: motion_speed(videos)


def _import_model_rewards() -> None:
    """Register the model-based rewards (their modules import transformers lazily)."""
    from . import clip_rewards, imagereward  # noqa: F401


def _import_callable(spec: str) -> RewardFn:
    """``module:attr`` -> the object; ValueError naming ``--reward`` when it is not there."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--reward: expected a registered name or module:callable, got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--reward: could not import module {module_name!r} of {spec!r} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--reward: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--reward: {spec!r} is a {type(target).__name__}, not a callable")
    return target


def check_reward(name: str, options: RewardOptions = RewardOptions(), media: str = "images") -> None:
    """ValueError (naming the flag, expected and actual) when ``--reward name`` cannot be built
    with ``options`` or scores another medium than ``media`` (the pipeline's); loads no weights."""
    if ":" in name:
        _import_callable(name)
        return
    _import_model_rewards()
    if name not in REWARDS:
        raise ValueError(f"--reward: expected one of {sorted(REWARDS)} or module:callable, got {name!r}")
    if REWARDS[name].media != media:
        fitting = sorted(n for n, spec in REWARDS.items() if spec.media == media)
        raise ValueError(
            f"--reward: {name!r} scores {REWARDS[name].media} and this pipeline makes {media}; expected one of "
            f"{fitting} or module:callable"
        )
    REWARDS[name].check(options)


class Reward:
    """A resolved ``--reward``: ``reward(images [N, H, W, 3] uint8, prompts) -> [N] float64``
    (``media == "videos"``: clips ``[N, F, H, W, 3]``), its output checked (one finite number per
    image; ValueError naming the reward otherwise)."""

    def __init__(self, name: str, fn: RewardFn, media: str = "images"):
        self.name, self.fn, self.media = name, fn, media

    def __call__(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != MEDIA_NDIM[self.media] or images.shape[-1] != 3 or images.dtype != np.uint8:
            layout = "[N, H, W, 3]" if self.media == "images" else "[N, F, H, W, 3]"
            raise ValueError(
                f"reward {self.name!r}: {self.media} must be {layout} uint8, got {images.dtype} {images.shape}"
            )
        if len(prompts) != len(images):
            raise ValueError(f"reward {self.name!r}: {len(images)} images but {len(prompts)} prompts")
        scores = np.asarray(self.fn(images, list(prompts)), dtype=np.float64).reshape(-1)
        if scores.shape != (len(images),) or not np.isfinite(scores).all():
            raise ValueError(
                f"--reward {self.name}: expected {len(images)} finite scores, one per image, got "
                f"shape {scores.shape} with {int((~np.isfinite(scores)).sum())} non-finite"
            )
        return scores


def load_reward(name: str, options: RewardOptions = RewardOptions(), media: str = "images") -> Reward:
    """The reward ``--reward name`` (a registered name or ``module:callable``) of ``media``
    (``"images"`` or ``"videos"``), checked first."""
    check_reward(name, options, media)
    if ":" in name:
        return Reward(name, _import_callable(name), media)
    return Reward(name, REWARDS[name].build(options), media)


def reward_names() -> list[str]:
    """Every registered reward name (the ``--reward`` choices besides ``module:callable``)."""
    _import_model_rewards()
    return sorted(REWARDS)
