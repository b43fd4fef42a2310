"""CLIP-based rewards on transformers' ``CLIPModel``, read from local directories only.

Each takes ``--reward_model_path DIR`` (a transformers ``CLIPModel`` directory: ``config.json``
and ``model.safetensors`` or ``pytorch_model.bin``) and the processor beside it or at
``--reward_processor_path`` (``preprocessor_config.json`` and the tokenizer files):

- ``clip``: CLIP score, ``100 * cos(image, text)`` of the projected embeddings (torchmetrics'
  ``CLIPScore`` without its clamp at 0, so negative similarities still order);
- ``pickscore``: PickScore (Kirstain et al. 2023, a CLIP-H fine-tuned on Pick-a-Pic):
  ``logit_scale.exp() * cos(image, text)``, as its reference scoring code computes it; the
  released weights are a ``CLIPModel`` directory whose processor is CLIP-H's
  (``--reward_processor_path``);
- ``hpsv2``: HPSv2 (Wu et al. 2023): ``cos(image, text)`` of its fine-tuned CLIP-H, read in
  the ``CLIPModel`` layout (the released ``HPS_v2_compressed.pt`` is an open_clip checkpoint,
  refused with the conversion to do);
- ``aesthetic``: the LAION improved aesthetic predictor: an MLP (``--reward_head_path``, the
  released ``.pth`` state dict or a safetensors file of it) on the L2-normalised CLIP ViT-L/14
  image embedding (the prompt is not read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .rewards import RewardOptions, register_reward

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers < 5, >= 5
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _require_clip_dir(name: str, options: RewardOptions, what: str) -> None:
    """ValueError unless ``options.model_path`` is a local ``CLIPModel`` directory with weights
    and a processor (beside it or at ``options.processor_path``)."""
    path = options.model_path
    if path is None:
        raise ValueError(
            f"--reward {name} needs {what} on local disk (nothing is downloaded): pass --reward_model_path "
            f"DIR, a transformers CLIPModel directory (config.json and model.safetensors); got no path"
        )
    directory = Path(path)
    if directory.is_file() and directory.suffix in (".pt", ".pth", ".bin"):
        raise ValueError(
            f"--reward_model_path: --reward {name} reads a transformers CLIPModel directory, got the file "
            f"{path!r}; a checkpoint of another library (e.g. HPSv2's open_clip HPS_v2_compressed.pt) must "
            f"be converted to the CLIPModel layout first, or scored through --reward module:callable"
        )
    if not (directory / "config.json").is_file() or not any((directory / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(
            f"--reward_model_path: --reward {name} needs {what}: a CLIPModel directory with config.json and "
            f"one of {list(WEIGHT_FILES)}, got {path!r}"
            + (
                " (does not exist)"
                if not directory.exists()
                else f" holding {sorted(p.name for p in directory.iterdir())[:8]}"
            )
        )
    processor = Path(options.processor_path or path)
    has_tokenizer = any(all((processor / f).is_file() for f in group) for group in TOKENIZER_FILES)
    if not any((processor / f).is_file() for f in PROCESSOR_FILES) or not has_tokenizer:
        flag = "--reward_processor_path" if options.processor_path else "--reward_model_path"
        raise ValueError(
            f"{flag}: --reward {name} needs a CLIP processor (preprocessor_config.json or processor_config.json, "
            f"and tokenizer.json or vocab.json + merges.txt) in {str(processor)!r}; "
            f"pass --reward_processor_path DIR where the model directory has none "
            f"(PickScore's and HPSv2's processors are CLIP-H's)"
        )


class ClipEmbedder:
    """A local ``CLIPModel`` and its processor: L2-normalised image and text embeddings."""

    def __init__(self, options: RewardOptions):
        from transformers import CLIPModel, CLIPProcessor  # here: importing the rewards stays fast

        self.device, self.batch_size = torch.device(options.device), options.batch_size
        self.model = CLIPModel.from_pretrained(options.model_path, local_files_only=True).eval().to(self.device)
        self.processor = CLIPProcessor.from_pretrained(
            options.processor_path or options.model_path, local_files_only=True
        )

    @staticmethod
    def _features(out) -> torch.Tensor:
        """``get_*_features``' projected embeddings (a tensor, or transformers 5's output's pooler_output)."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def images(self, images: np.ndarray) -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 -> ``[N, D]`` float64 unit image embeddings."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, self.model.dtype)
            out.append(self._features(self.model.get_image_features(pixel_values=pixels)).double().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """``N`` prompts -> ``[N, D]`` float64 unit text embeddings (truncated to the model's length)."""
        out = []
        limit = self.model.config.text_config.max_position_embeddings
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor(
                text=prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            out.append(self._features(self.model.get_text_features(**tokens)).double().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def cosine(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """``[N]`` float64 cosine similarity of each image with its prompt."""
        return (self.images(images) * self.texts(prompts)).sum(-1)


def _check(name: str, what: str):
    return lambda options: _require_clip_dir(name, options, what)


@register_reward("clip", "CLIP score, 100 cos(image, prompt), of a local CLIPModel", _check("clip", "a CLIP model"))
def _clip(options: RewardOptions):
    clip = ClipEmbedder(options)
    return lambda images, prompts: (100.0 * clip.cosine(images, prompts)).numpy()


@register_reward(
    "pickscore",
    "PickScore, logit_scale.exp() cos(image, prompt), of a local PickScore CLIPModel",
    _check("pickscore", "PickScore's weights (a local copy of yuvalkirstain/PickScore_v1)"),
)
def _pickscore(options: RewardOptions):
    clip = ClipEmbedder(options)
    scale = float(clip.model.logit_scale.detach().double().exp())  # host-ok: offline scorer, read once
    return lambda images, prompts: (scale * clip.cosine(images, prompts)).numpy()


@register_reward(
    "hpsv2",
    "HPSv2, cos(image, prompt), of a local HPSv2 model in the CLIPModel layout",
    _check("hpsv2", "HPSv2's weights in the transformers CLIPModel layout"),
)
def _hpsv2(options: RewardOptions):
    clip = ClipEmbedder(options)
    return lambda images, prompts: clip.cosine(images, prompts).numpy()


def aesthetic_head(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The improved aesthetic predictor's MLP from its state dict (``layers.{0,2,4,6,7}``: five
    linear layers, dropout between the first four, no activations), widths read from the tensors."""
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    if indices != [0, 2, 4, 6, 7]:
        raise ValueError(
            f"--reward_head_path: expected the aesthetic predictor's state dict (layers.0/2/4/6/7 weights and "
            f"biases), got keys {sorted(state)[:10]}"
        )
    modules: list[torch.nn.Module] = []
    for position in range(8):
        if position in indices:
            weight = state[f"layers.{position}.weight"]
            modules.append(torch.nn.Linear(weight.shape[1], weight.shape[0]))
        else:
            modules.append(torch.nn.Dropout(0.0))
    head = torch.nn.Sequential()
    head.add_module("layers", torch.nn.Sequential(*modules))
    head.load_state_dict(state)
    return head.eval()


def _read_head(path: str) -> dict[str, torch.Tensor]:
    """The head's tensors from a safetensors file or a ``torch.save`` state dict (weights only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_aesthetic(options: RewardOptions) -> None:
    _require_clip_dir(
        "aesthetic", options, "the CLIP ViT-L/14 the predictor was trained on (openai/clip-vit-large-patch14)"
    )
    if options.head_path is None or not Path(options.head_path).is_file():
        raise ValueError(
            f"--reward_head_path: --reward aesthetic needs the predictor's MLP weights on local disk (e.g. "
            f"sac+logos+ava1-l14-linearMSE.pth, or a safetensors file of it), got {options.head_path!r}"
            + ("" if options.head_path is None else " (not a file)")
        )


@register_reward(
    "aesthetic", "LAION improved aesthetic predictor: MLP on the unit CLIP image embedding", _check_aesthetic
)
def _aesthetic(options: RewardOptions):
    clip = ClipEmbedder(options)
    head = aesthetic_head(_read_head(options.head_path)).double()

    def score(images, prompts):
        with torch.no_grad():
            return head(clip.images(images))[:, 0].numpy()

    return score
