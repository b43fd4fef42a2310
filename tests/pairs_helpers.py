"""Helpers of the fastpref-pairs tests: a tiny random-weight CLIP model directory built from
configs (no download) and a short command line on the bundled tiny pipeline."""

import os
import time
from pathlib import Path

import numpy as np

# bundled tiny pipeline, 4 DDIM steps: a few seconds on one core
FAST_PAIRS = ["--num_inference_steps", "4", "--no_progress", "--batch_size", "8"]


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel (1 layer, width 16, 32 px images, projection 8) and its
    processor (the tiny caption tokenizer) saved to ``path``."""
    import torch  # here: the blocking reward's subprocess imports this module without transformers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fastpref.tiny.shapes import CAPTION_WORDS
    from fastpref.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(CAPTION_WORDS, 16)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
        logit_scale_init_value=2.0,
    )
    model = CLIPModel(config)
    with torch.no_grad():  # a logit scale other than CLIP's init, so a missing exp() shows
        model.logit_scale.fill_(1.7)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


BLOCK_AFTER = "FASTPREF_TEST_BLOCK_AFTER"
_calls = [0]


def blocking_colourfulness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The colourfulness reward (a module:callable reward) that, when the environment sets
    ``FASTPREF_TEST_BLOCK_AFTER=n``, hangs on its call n + 1: a run that has written exactly n
    part files (one call per part), waiting to be killed."""
    from fastpref.tiny.reward import colourfulness

    _calls[0] += 1
    if _calls[0] > int(os.environ.get(BLOCK_AFTER, "1000000000")):
        time.sleep(600)
    return colourfulness(images)
