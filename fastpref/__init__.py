"""fastpref: fused Triton kernels for preference alignment of diffusion models.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1 is
set on import unless the variable is already set), so CPU tensors work there.
"""
from fastpref import kernels  # noqa: F401  (first: decides interpreter vs compiled kernels)
from fastpref.functions import DiffusionDPOFunction, DSPOFunction, SFTFunction
from fastpref.losses import diffusion_dpo_loss, dspo_loss, sft_loss
from fastpref.module import PreferenceLoss

__version__ = "0.1.0"

__all__ = [
    "DSPOFunction", "DiffusionDPOFunction", "PreferenceLoss", "SFTFunction",
    "diffusion_dpo_loss", "dspo_loss", "sft_loss",
]
