"""fastpref: fused Triton kernels for preference alignment of diffusion models.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1 is
set on import unless the variable is already set), so CPU tensors work there.
"""

from fastpref import kernels  # noqa: F401  (first: decides interpreter vs compiled kernels)
from fastpref.functions import (
    DenseDPOFunction,
    DiffusionDPOFunction,
    DMPOFunction,
    DSPOFunction,
    FusedLossFunction,
    KTOFunction,
    Launch,
    MaPOFunction,
    RPODiagonalFunction,
    RPOFunction,
    SDPOFunction,
    SFTFunction,
    SSPOFunction,
)
from fastpref.kernels import REGISTRY
from fastpref.losses import (
    FUNCTIONS,
    dense_dpo_loss,
    diffusion_dpo_loss,
    dmpo_loss,
    dspo_loss,
    kto_loss,
    mapo_loss,
    rpo_diagonal_loss,
    rpo_loss,
    sdpo_loss,
    sft_loss,
    sspo_loss,
)
from fastpref.metrics import kto_baseline, row_errors
from fastpref.module import METHODS, PreferenceLoss

__version__ = "0.1.0"

__all__ = [
    "DMPOFunction",
    "DSPOFunction",
    "DenseDPOFunction",
    "DiffusionDPOFunction",
    "KTOFunction",
    "METHODS",
    "MaPOFunction",
    "PreferenceLoss",
    "RPODiagonalFunction",
    "RPOFunction",
    "SDPOFunction",
    "SFTFunction",
    "SSPOFunction",
    "dense_dpo_loss",
    "diffusion_dpo_loss",
    "dmpo_loss",
    "dspo_loss",
    "kto_baseline",
    "kto_loss",
    "mapo_loss",
    "row_errors",
    "rpo_diagonal_loss",
    "rpo_loss",
    "sdpo_loss",
    "sft_loss",
    "sspo_loss",
    "FusedLossFunction",
    "Launch",
    "REGISTRY",
]
# Every registered method's public function, also one that only has a head file (losses.generic_loss).
for _name, _function in FUNCTIONS.items():
    globals()[REGISTRY[_name].function] = _function
    if REGISTRY[_name].function not in __all__:
        __all__.append(REGISTRY[_name].function)
