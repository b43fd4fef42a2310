"""ImageReward (Xu et al. 2023): refused for now, with what it would take.

Its model is BLIP's ITM (ViT-L image encoder, BERT text encoder with cross-attention) with an
MLP head; the only code that loads the released ``ImageReward.pt`` is the ``image-reward``
package, which downloads its ``med_config.json`` and BERT tokenizer on every load and pins old
timm/fairscale releases, so fastpref does not build on it. Score it through
``--reward module:callable`` wrapping that package on a machine that has its files.
"""

from .rewards import RewardOptions, register_reward


def _refuse(options: RewardOptions) -> None:
    raise ValueError(
        "--reward imagereward: not available: the released ImageReward.pt loads only through the image-reward "
        "package, which downloads its BLIP config and BERT tokenizer at load time; fastpref reads local weights "
        "only. Wrap ImageReward yourself as --reward my_module:score (score(images [N, H, W, 3] uint8, prompts) "
        "-> [N] scores), or use --reward pickscore / hpsv2 / clip / aesthetic with local weights"
    )


@register_reward(
    "imagereward", "ImageReward: refused (its loader downloads at load time); use module:callable", _refuse
)
def _imagereward(options: RewardOptions):
    _refuse(options)
