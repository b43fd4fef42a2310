"""PreferenceLoss: the same numbers as the functions, hyperparameters checked in __init__."""

import pytest
import torch
from helpers import make_inputs

import fastpref


@pytest.mark.parametrize(
    "method,fn,kw",
    [
        ("dpo", fastpref.diffusion_dpo_loss, dict(beta=50.0, loss_type="hinge")),
        ("dspo", fastpref.dspo_loss, dict(beta=1.0, variant="sdxl", sdxl_threshold=0.0)),
        ("sft", fastpref.sft_loss, dict(winners_only=True)),
    ],
)
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


@pytest.mark.parametrize("name", ["dense_dpo", "kto", "mapo", "rpo", "sdpo_dspo_sdxl"])
def test_module_runs_every_method_with_its_inputs(name, device):
    from loss_calls import CALLS, _emb, _labels, _timesteps

    fn, uses_ref, kw, extras = CALLS[name]
    method = next(m for m, f in fastpref.METHODS.items() if f is fn)
    p, r, t = make_inputs((4, 3, 6, 6), torch.float32, device, 8, 0.1)
    inputs = {"timesteps": _timesteps(p)} if "timesteps" in extras else {}
    if "labels" in extras:
        inputs["labels"] = _labels(p)
    if "emb" in extras:
        inputs["emb_w"] = _emb(p)
    loss1, m1 = fastpref.PreferenceLoss(method, **kw)(p, r if uses_ref else None, t, **inputs)
    loss2, m2 = fn(p, *([r] if uses_ref else []), t, **inputs, **kw)
    assert torch.equal(loss1, loss2) and m1.keys() == m2.keys()


@pytest.mark.parametrize(
    "method,kw,arg",
    [
        ("sdpo", dict(mu=1.5), "mu"),
        ("sdpo", dict(base="orpo"), "base"),
        ("dense_dpo", dict(gamma=0.0), "gamma"),
        ("kto", dict(lambda_u=-1.0), "lambda_u"),
        ("rpo", dict(tau=0.0), "tau"),
        ("mapo", dict(snr_value=-1.0), "snr_value"),
        ("rpo_diagonal", dict(diagonal_weight=8.0), "diagonal_weight"),
        ("sspo", dict(criterion="max"), "criterion"),
    ],
)
def test_module_checks_hyperparameters_in_init(method, kw, arg):
    with pytest.raises(ValueError, match=arg):
        fastpref.PreferenceLoss(method, **kw)
