"""The model-specific half of the trainer behind one small interface, ``ModelFamily``, and the
registry that picks a family from a pipeline directory's ``model_index.json`` ``_class_name``.

The trainer (``fastpref.train``) and its step (``fastpref.training.step``) call only the methods
below; everything that depends on the architecture (which components to load, how prompts are
encoded, the noise schedule and the regression target, the denoiser's keyword arguments, the
VAE's latent scaling, the LoRA file format) lives in one file per family under
``fastpref/training/families/``. Each such file registers its class with ``@register``; the
registry imports every module of that package, so a new family is one new file. docs/training.md
lists the methods with their shapes and dtypes.

Tensor conventions: ``R`` rows per micro-batch; latents ``[R, *latent_shape]`` float32 (images
``(C, h, w)``, video ``(C, F, h, w)``); timesteps ``[R]`` int64 indices into the family's
training schedule ``0..num_train_timesteps - 1`` (flow-matching families, ``fastpref.training.flow``:
float32 scheduler timesteps ``σ · num_train_timesteps``); prompt embeddings ``[R, L, D]`` and pooled
embeddings ``[R, P]`` in the weight dtype; extra conditioning ``[R, E]`` float32 (SDXL's time
ids, ``E = 6``; ``E = 0`` for families that take none, see ``prepare_images``).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

# a directory without model_index.json is read as this pipeline, as the trainer did before the registry
LEGACY_CLASS_NAME = "StableDiffusionPipeline"
FAMILIES: dict[str, type[ModelFamily]] = {}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU through pinned memory without blocking
    the host, which can then prepare the next batch during the step."""
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_pipeline_dir(path: Path, subfolders, what: str, note: str = "") -> None:
    """Refuse ``path`` unless it is a directory holding every one of ``subfolders``: ValueError
    naming --pretrained_model_name_or_path, ``what`` pipeline was expected (``note`` after the
    subfolder list, e.g. which are optional) and what is missing."""
    missing = [s for s in subfolders if not (path / s).is_dir()]
    if not path.is_dir() or missing:
        raise ValueError(
            f"--pretrained_model_name_or_path: expected a local diffusers {what} directory with subfolders "
            f"{list(subfolders)}{note}, got {str(path)!r}"
            + (f" (missing {missing})" if path.is_dir() else " (not a directory)")
        )


class ModelFamily(ABC):
    """One pipeline architecture: its frozen encoders, trainable denoiser and noise schedule.

    ``load`` returns an instance whose ``denoiser`` (the module the trainer trains, float32 on
    ``device``) and frozen encoders (in ``weight_dtype``) are ready. Class-level ``check`` and
    ``default_resolution`` read only configuration files, so bad input fails before any weight
    is loaded or any file written.
    """

    class_names: tuple[str, ...] = ()  # model_index.json ``_class_name`` values this family trains
    flag_kinds: tuple[str, ...] = ()  # kinds of family-specific flags (args.FAMILY_FLAGS) it takes
    media: str = "images"  # what its preference data holds: "images" (Pick-a-Pic parquet) or "videos"
    denoiser: torch.nn.Module
    device: torch.device
    weight_dtype: torch.dtype

    # --- before loading (configuration files only) ---

    @classmethod
    @abstractmethod
    def check(cls, path: Path) -> int:
        """Validate the pipeline directory ``path``; returns the VAE's spatial downsampling
        factor (the training resolution must be a multiple of it). ValueError naming
        ``--pretrained_model_name_or_path`` otherwise."""

    @classmethod
    @abstractmethod
    def default_resolution(cls, path: Path) -> int | None:
        """The training resolution when ``--resolution`` is not given (pixels, square); None: the
        data's (video families: the first video's shorter side)."""

    @classmethod
    def check_resolution(cls, path: Path, resolution: int) -> None:
        """Refuse a training ``resolution`` (pixels, already a multiple of ``check``'s factor) that
        the denoiser cannot take (patching, packing, position tables): ValueError naming
        ``--resolution``, expected and actual. Reads configuration files only; default: any."""
        return None

    @classmethod
    def check_num_frames(cls, path: Path, num_frames: int) -> None:
        """Video families: refuse a clip length ``--num_frames`` the VAE cannot encode (ValueError
        naming the flag, expected and actual). Reads configuration files only; default: any."""
        return None

    @classmethod
    def check_flags(cls, config) -> None:
        """Refuse every family-specific flag (``args.FAMILY_FLAGS``, e.g. the flow-matching
        ``--weighting_scheme``) given in ``config`` (not None) whose kind is not in
        ``cls.flag_kinds``: ValueError naming the flag and this family. Reads no file."""
        from .args import FAMILY_FLAGS

        for name, kind in FAMILY_FLAGS.items():
            value = getattr(config, name, None)
            if value is not None and kind not in cls.flag_kinds:
                raise ValueError(
                    f"--{name}: a {kind} flag, but --pretrained_model_name_or_path is a "
                    f"{'/'.join(cls.class_names)} ({cls.__name__}), which takes no {kind} flags; got {value!r}"
                )

    def configure(self, config) -> None:
        """Take the family-specific flags of ``config`` after ``load`` (``fastpref.training.run.build``
        calls it; ``check_flags`` has passed). The default takes none."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, path: Path, device: torch.device, weight_dtype: torch.dtype) -> ModelFamily:
        """The family's components from ``path``: frozen encoders in ``weight_dtype`` and the
        trainable denoiser in float32, on ``device``."""

    # --- set-up of the trainable denoiser ---

    @abstractmethod
    def set_attention(self, use_xformers: bool | None) -> str:
        """Choose the denoiser's attention back-end (``--enable_xformers_memory_efficient_attention``:
        True requires xformers, None picks it when it runs); returns the back-end's name."""

    @abstractmethod
    def add_lora(self, rank: int) -> list[torch.nn.Parameter]:
        """Freeze the denoiser (cast to the weight dtype) and attach float32 LoRA adapters of
        rank ``rank`` to the family's target modules; returns the trainable parameters."""

    @abstractmethod
    def save_weights(self, reference: str, output_dir: Path) -> None:
        """The trained result in the pipeline's own format: LoRA (``reference == "lora"``) as the
        pipeline class's ``save_lora_weights`` writes it, else the full denoiser's
        ``save_pretrained`` directory."""

    # --- data: stream items to batch tensors (eager, before the step) ---

    @abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """Shape of one latent at ``resolution``: ``(C, h, w)``, or ``(C, F, h, w)`` for video."""

    @abstractmethod
    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """One training timestep, a 0-dim int64 index into the schedule, drawn from ``generator``."""

    @abstractmethod
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``N`` captions -> ``(embeddings [N, L, D], pooled [N, P])`` in the weight dtype, on the
        device: the denoiser's text conditioning, and the pooled embeddings that RPO's prompt
        weights and pooled-conditioned denoisers read."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, latent_eps: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` (video: ``[N, 3, F, H, W]``) pixels in [-1, 1] -> ``[N, *latent_shape]``
        float32 latents in the denoiser's space (VAE scaling and shift applied), sampled from the
        VAE posterior with the standard-normal ``latent_eps`` of the same shape (host or device)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``encode_images`` (SSPO's self-samples): ``[N, *latent_shape]`` latents ->
        pixels ``[N, 3, H, W]`` (video ``[N, 3, F, H, W]``), roughly in [-1, 1]."""

    def prepare_images(
        self,
        images: list[bytes],
        resolution: int,
        *,
        random_crop: bool,
        hflip: bool,
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One stream item's encoded images (a pair, or one image) decoded, resized, cropped and
        flipped alike, with random draws from ``generator``: ``([3, resolution, resolution]``
        float32 pixels in [-1, 1] per image, ``extra [E]`` float32``)``, the item's extra
        conditioning, which ``denoise`` receives per row (SDXL: the original-size / crop /
        target-size time ids). The default is ``fastpref.training.data.load_pixels`` and an empty
        ``extra`` (``E = 0``) for families whose denoiser takes no extra conditioning."""
        from .data import load_pixels  # here: the data libraries (PIL, pyarrow) load with the data

        pixels = load_pixels(images, resolution, random_crop=random_crop, hflip=hflip, generator=generator)
        return pixels, torch.zeros(0)

    # --- the step (device only, no host synchronisation) ---

    @abstractmethod
    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy, target)``, both ``[R, *latent_shape]``: the latents noised to ``timesteps``
        and what the denoiser regresses there (epsilon, v, or flow matching's ``noise - x0``)."""

    def error_weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """``[R]`` float32 weights of each row's squared error at ``timesteps`` ``[R]`` (the losses
        then see ``sqrt(w)`` times prediction and target), or None: unweighted (the default)."""
        return None

    @abstractmethod
    def denoise(
        self,
        model: Callable,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``model`` (the denoiser, a DDP wrapper of it, or the reference copy) called with the
        family's conditioning; returns the prediction ``[R, *latent_shape]``, comparable with
        ``add_noise``'s target. ``timesteps`` is ``[R]`` or 0-dim (the sampler's). ``extra`` is
        the rows' extra conditioning ``[R, E]`` float32 (``prepare_images``; SDXL's time ids);
        families without extra conditioning ignore it, and it may be None or ``[R, 0]``."""

    @abstractmethod
    def sample(
        self,
        predict: Callable,
        embeddings: torch.Tensor,
        pooled: torch.Tensor,
        negative: torch.Tensor,
        negative_pooled: torch.Tensor,
        start: torch.Tensor,
        *,
        num_steps: int,
        guidance_scale: float,
    ) -> torch.Tensor:
        """SSPO's self-sampler: ``[B, *latent_shape]`` latents sampled in ``num_steps`` steps from
        ``start`` noise with classifier-free guidance of the prompts ``embeddings [B, L, D]``,
        ``pooled [B, P]`` against ``negative [1, L, D]``, ``negative_pooled [1, P]``.
        ``predict(noisy, t, embeddings, pooled, extra=None)`` is ``denoise`` bound to the replay
        model. A family with extra conditioning (``E > 0``) also takes the keyword ``extra [B, E]``
        (the winners' rows; the self-sampler passes it only then) and conditions both the
        unconditional and the conditional half on it, as its pipeline does."""


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make ``cls`` the family of each of its ``class_names``."""
    if not cls.class_names:
        raise TypeError(f"{cls.__name__}: class_names is empty; name the model_index.json _class_name values")
    for name in cls.class_names:
        if FAMILIES.get(name, cls) is not cls:
            raise TypeError(f"{cls.__name__}: _class_name {name!r} is already {FAMILIES[name].__name__}'s")
        FAMILIES[name] = cls
    return cls


def _import_families() -> None:
    """Import every module of ``fastpref.training.families`` (each registers its classes)."""
    from . import families

    for module in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{module.name}")


def pipeline_class_name(path: str | Path) -> str:
    """``_class_name`` of ``path/model_index.json`` (``LEGACY_CLASS_NAME`` when the file is absent)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return LEGACY_CLASS_NAME
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(
            f"--pretrained_model_name_or_path: could not read {str(index)!r} as a diffusers "
            f"model_index.json ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(name, str):
        raise ValueError(f"--pretrained_model_name_or_path: {str(index)!r} has no string _class_name, got {name!r}")
    return name


def family_class(path: str | Path) -> type[ModelFamily]:
    """The registered family of the pipeline directory ``path``; ValueError naming the
    ``_class_name`` and the known ones otherwise."""
    name = pipeline_class_name(path)
    _import_families()
    if name not in FAMILIES:
        raise ValueError(
            f"--pretrained_model_name_or_path: model_index.json names _class_name {name!r}, which no "
            f"model family trains; known: {sorted(FAMILIES)} (a family is one file in "
            f"fastpref/training/families/, see docs/training.md)"
        )
    return FAMILIES[name]


def load_family(path: str | Path, device: torch.device, weight_dtype: torch.dtype) -> ModelFamily:
    """``family_class(path).load(path, device, weight_dtype)``."""
    return family_class(path).load(Path(path), device, weight_dtype)
