"""PreferenceLoss: the same numbers as the functions, hyperparameters checked in __init__."""
import pytest
import torch

import fastpref
from helpers import make_inputs


@pytest.mark.parametrize("method,fn,kw", [
    ("dpo", fastpref.diffusion_dpo_loss, dict(beta=50.0, loss_type="hinge")),
    ("dspo", fastpref.dspo_loss, dict(beta=1.0, variant="sdxl", sdxl_threshold=0.0)),
    ("sft", fastpref.sft_loss, dict(winners_only=True)),
])
def test_module_matches_function(method, fn, kw, device):
    p, r, t = make_inputs((4, 3, 6, 6), torch.float32, device, 8, 0.1)
    module = fastpref.PreferenceLoss(method, **kw)
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    if method == "sft":
        loss1, m1 = module(p1, None, t)
        loss2, m2 = fn(p2, t, **kw)
    else:
        loss1, m1 = module(p1, r, t)
        loss2, m2 = fn(p2, r, t, **kw)
    loss1.backward()
    loss2.backward()
    assert torch.equal(loss1, loss2) and torch.equal(p1.grad, p2.grad)
    assert m1.keys() == m2.keys()
    assert method in repr(module)


def test_reference_free_method_refuses_ref_pred(device):
    p, r, t = make_inputs((4, 3, 6, 6), torch.float32, device, 8, 0.1)
    with pytest.raises(ValueError, match="ref_pred"):
        fastpref.PreferenceLoss("sft")(p, r, t)
