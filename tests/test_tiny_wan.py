"""The tiny Wan builder's parts (``fastpref/tiny/motion.py``, ``motion_reward.py``, ``wan_vae.py``,
``umt5.py``): procedural clips move as captioned, the temporal reward reads their speed, the
constructed VAE keeps the motion, the tokenizer loads offline through ``AutoTokenizer``."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fastpref.tiny.motion import DIRECTIONS, SPEED_RANGE, parse_caption, random_videos, render_video
from fastpref.tiny.motion_reward import centroids, motion_speed
from fastpref.tiny.umt5 import build_umt5_tokenizer
from fastpref.tiny.wan_vae import identity_init, tiny_wan_vae, to_pixels, to_uint8


def test_clips_move_as_captioned_at_their_speed():
    videos, prompts, speeds = random_videos(48, seed=3)
    assert videos.shape == (48, 9, 32, 32, 3) and videos.dtype == np.uint8
    assert SPEED_RANGE[0] <= speeds.min() and speeds.max() <= SPEED_RANGE[1]
    c = centroids(videos)
    for i, prompt in enumerate(prompts):
        dx, dy = DIRECTIONS[parse_caption(prompt)[2]]
        step = (c[i, -1] - c[i, 0]) / 8
        assert np.dot(step, (dx, dy)) == pytest.approx(speeds[i], abs=0.05)  # along the caption's direction
        assert abs(np.dot(step, (dy, dx))) < 0.05  # nothing across it
    assert np.abs(motion_speed(videos) - speeds).max() < 0.05


def test_reward_is_temporal_not_per_frame():
    rng = np.random.default_rng(0)
    fast = render_video("red", "circle", "right", rng, speed=1.5)
    rng = np.random.default_rng(0)  # same size, colour and background: every frame alike but for the position
    slow = render_video("red", "circle", "right", rng, speed=0.5)
    chroma = [(v.max(-1).astype(int) - v.min(-1)).sum(axis=(1, 2)) for v in (fast, slow)]
    assert np.allclose(chroma[0], chroma[0][0], rtol=0.02) and np.allclose(chroma[1], chroma[0][0], rtol=0.02)
    shuffled = fast[[4, 0, 8, 2, 6, 1, 7, 3, 5]]  # the same frames in another order
    scores = motion_speed(np.stack([fast, slow, shuffled]))
    assert scores[0] == pytest.approx(1.5, abs=0.05) and scores[1] == pytest.approx(0.5, abs=0.05)
    assert scores[2] < 0.5 * scores[0]
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion_speed(fast[None, :1])


def test_constructed_vae_keeps_the_motion():
    vae = identity_init(tiny_wan_vae()).eval()
    videos, _, _ = random_videos(8, seed=11)
    with torch.no_grad():
        posterior = vae.encode(to_pixels(videos)).latent_dist
        recon = to_uint8(vae.decode(posterior.mode()).sample)
    assert posterior.mean.shape == (8, 4, 5, 8, 8)
    assert recon.shape == videos.shape
    assert np.corrcoef(motion_speed(recon), motion_speed(videos))[0, 1] > 0.99
    assert np.abs(recon.astype(float) - videos).mean() < 8  # of 255: blocky, not blurred away


def test_umt5_tokenizer_round_trips_offline(tmp_path):
    tokenizer = build_umt5_tokenizer(["a", "red", "circle"])
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("a red circle", padding="max_length", max_length=6).input_ids
    assert ids == [3, 4, 5, 1, 0, 0]  # one token per word, </s>, then <pad>
    assert loaded("a blue circle").input_ids == [3, 2, 5, 1]  # unknown word: <unk>
