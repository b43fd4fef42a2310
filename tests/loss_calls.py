"""One representative call per method and variant, for the checks every method must pass
(no host sync, memory, validation)."""
import fastpref

# name -> (function, uses ref_pred, keyword arguments)
CALLS = {
    "dpo-sigmoid": (fastpref.diffusion_dpo_loss, True, dict(beta=5000.0)),
    "dpo-hinge": (fastpref.diffusion_dpo_loss, True, dict(beta=50.0, loss_type="hinge")),
    "dpo-ipo": (fastpref.diffusion_dpo_loss, True, dict(beta=50.0, loss_type="ipo")),
    "sft": (fastpref.sft_loss, False, dict()),
    "sft-winners": (fastpref.sft_loss, False, dict(winners_only=True)),
    "dspo-sd15": (fastpref.dspo_loss, True, dict(beta=0.001)),
    "dspo-sdxl": (fastpref.dspo_loss, True, dict(beta=5000.0, variant="sdxl")),
}


def call(name, model_pred, ref_pred, target):
    fn, uses_ref, kw = CALLS[name]
    return fn(model_pred, ref_pred, target, **kw) if uses_ref else fn(model_pred, target, **kw)
