"""Rewards of fastpref-pairs: the registry, module:callable, each CLIP-based scorer on a tiny
random-weight CLIPModel against a float64 reference, and the refusals without weights."""

import sys
import types

import numpy as np
import pytest
import torch
from pairs_helpers import write_tiny_clip
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from fastpref.pairs.rewards import RewardOptions, check_reward, load_reward, reward_names

PROMPTS = ["a red circle", "a blue square", "a small green triangle", "a red circle", "a big yellow square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).integers(0, 256, (len(PROMPTS), 32, 32, 3), dtype=np.uint8)


def reference_embeddings(path, images, prompts):
    """Unit image and text embeddings in float64, computed eagerly from the model's parts."""
    model = CLIPModel.from_pretrained(path).double().eval()
    processor = CLIPProcessor.from_pretrained(path)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].double()
    tokens = processor(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True), model


def test_registry_lists_the_rewards():
    assert {"colourfulness", "clip", "pickscore", "hpsv2", "aesthetic", "imagereward"} <= set(reward_names())


def test_colourfulness_reward_is_mean_chroma(images):
    x = images.astype(np.float64) / 255
    expected = (x.max(-1) - x.min(-1)).mean(axis=(1, 2))
    np.testing.assert_allclose(load_reward("colourfulness")(images, PROMPTS), expected, rtol=1e-12)


@pytest.mark.parametrize("name", ["clip", "pickscore", "hpsv2"])
def test_clip_scores_match_float64_reference(name, clip_dir, images):
    image, text, model = reference_embeddings(clip_dir, images, PROMPTS)
    cosine = (image * text).sum(-1)
    scale = {"clip": 100.0, "pickscore": float(model.logit_scale.detach().exp()), "hpsv2": 1.0}[name]
    scores = load_reward(name, RewardOptions(model_path=str(clip_dir), batch_size=2))(images, PROMPTS)
    assert scores.dtype == np.float64 and scores.shape == (len(PROMPTS),)
    np.testing.assert_allclose(scores, scale * cosine.numpy(), rtol=1e-4, atol=1e-5 * scale)
    assert np.ptp(scores) > 1e-3 * scale  # the images and prompts differ, so must the scores


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_on_unit_image_embedding(suffix, clip_dir, images, tmp_path):
    g = torch.Generator().manual_seed(3)
    widths = [8, 6, 5, 4, 3, 1]  # projection 8 -> ... -> 1, as the predictor's 768 -> 1024 -> 128 -> 64 -> 16 -> 1
    state = {}
    for layer, (w_in, w_out) in zip([0, 2, 4, 6, 7], zip(widths, widths[1:], strict=False), strict=True):
        state[f"layers.{layer}.weight"] = torch.randn(w_out, w_in, generator=g)
        state[f"layers.{layer}.bias"] = torch.randn(w_out, generator=g)
    head = tmp_path / f"head{suffix}"
    save_file(state, head) if suffix == ".safetensors" else torch.save(state, head)
    options = RewardOptions(model_path=str(clip_dir), head_path=str(head))
    scores = load_reward("aesthetic", options)(images, PROMPTS)
    x, _, _ = reference_embeddings(clip_dir, images, PROMPTS)
    for layer in [0, 2, 4, 6, 7]:  # linear layers, no activation between them
        x = x @ state[f"layers.{layer}.weight"].double().T + state[f"layers.{layer}.bias"].double()
    np.testing.assert_allclose(scores, x[:, 0].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["clip", "pickscore", "hpsv2", "aesthetic"])
def test_model_rewards_refused_without_weights(name, tmp_path):
    with pytest.raises(ValueError, match="--reward.*nothing is downloaded|--reward_model_path"):
        check_reward(name, RewardOptions())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"--reward_model_path: .*config\.json"):
        check_reward(name, RewardOptions(model_path=str(empty)))
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    checkpoint.write_bytes(b"not a CLIPModel directory")
    with pytest.raises(ValueError, match="converted to the CLIPModel layout"):
        check_reward(name, RewardOptions(model_path=str(checkpoint)))


def test_processor_and_head_refused_when_absent(clip_dir, tmp_path):
    model_only = tmp_path / "model_only"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(model_only)
    with pytest.raises(ValueError, match="--reward_model_path: --reward pickscore needs a CLIP processor"):
        check_reward("pickscore", RewardOptions(model_path=str(model_only)))
    check_reward("pickscore", RewardOptions(model_path=str(model_only), processor_path=str(clip_dir)))
    with pytest.raises(ValueError, match="--reward_head_path: --reward aesthetic needs"):
        check_reward("aesthetic", RewardOptions(model_path=str(clip_dir)))


def test_imagereward_refused_with_the_reason():
    with pytest.raises(ValueError, match="--reward imagereward: not available.*--reward my_module:score"):
        check_reward("imagereward", RewardOptions(model_path="/anything"))


def test_module_callable_reward_and_its_checks(images, monkeypatch):
    module = types.ModuleType("my_rewards")
    module.red = lambda imgs, prompts: imgs[..., 0].mean(axis=(1, 2)) + np.array([len(p) for p in prompts])
    module.bad_shape = lambda imgs, prompts: np.zeros(len(imgs) + 1)
    module.nan = lambda imgs, prompts: np.full(len(imgs), np.nan)
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    expected = images[..., 0].astype(np.float64).mean(axis=(1, 2)) + [len(p) for p in PROMPTS]
    np.testing.assert_allclose(load_reward("my_rewards:red")(images, PROMPTS), expected)
    for spec in ("my_rewards:bad_shape", "my_rewards:nan"):
        with pytest.raises(ValueError, match=f"--reward {spec}: expected 5 finite scores"):
            load_reward(spec)(images, PROMPTS)
    with pytest.raises(ValueError, match="not a callable"):
        check_reward("my_rewards:not_callable")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        check_reward("my_rewards:missing")
    with pytest.raises(ValueError, match="could not import module 'no_such_module_xyz'"):
        check_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="expected one of .*colourfulness.* or module:callable, got 'nope'"):
        check_reward("nope")
