"""The API contract of the extended losses (docs/methods.md §2.4-2.10): bad input raises ValueError/TypeError
naming the argument, before any kernel launch; boundary values docs/methods.md allows are accepted;
signatures and defaults are docs/methods.md's."""

import inspect

import pytest
import torch
from helpers import assert_bad_input_case, bad_input_case_ids, make_inputs

import fastpref

NAN, INF = float("nan"), float("inf")
EITHER = (TypeError, ValueError)


def cases(device):
    p, r, t = make_inputs((4, 3, 5, 5), torch.float32, device, 0)  # B = 2, n = 75
    odd = make_inputs((3, 3, 5, 5), torch.float32, device, 0)
    one = make_inputs((2, 3, 5, 5), torch.float32, device, 0)  # B = 1
    emb = torch.randn(2, 8, device=device)
    ts = torch.tensor([10, 500], device=device)
    labels = torch.tensor([1, 0, 1, 0], device=device)

    # RPO: embeddings [B, D], the same D; emb_l needs emb_w.
    yield "emb_w", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_w=emb[0])
    yield "emb_w", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_w=torch.randn(3, 8, device=device))
    yield "emb_w", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_w=emb[:, None])
    yield "emb_l", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_w=emb, emb_l=torch.randn(2, 7, device=device))
    yield "emb_l", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_w=emb, emb_l=torch.randn(4, 8, device=device))
    yield "emb_l", ValueError, lambda: fastpref.rpo_loss(p, r, t, emb_l=emb)
    yield "emb_w", EITHER, lambda: fastpref.rpo_loss(p, r, t, emb_w=[[1.0] * 8] * 2)
    yield "model_pred", ValueError, lambda: fastpref.rpo_loss(*odd)
    yield "ref_pred", ValueError, lambda: fastpref.rpo_loss(p, r[:, :2], t)
    # RPO-diagonal needs B >= 2.
    yield ("model_pred", "B"), ValueError, lambda: fastpref.rpo_diagonal_loss(*one)
    yield "model_pred", ValueError, lambda: fastpref.rpo_diagonal_loss(*odd)
    # SSPO.
    yield "criterion", ValueError, lambda: fastpref.sspo_loss(p, r, t, criterion="hinge")
    yield "model_pred", ValueError, lambda: fastpref.sspo_loss(*odd)
    yield "target", ValueError, lambda: fastpref.sspo_loss(p, r, t[:, :1])
    # Dense: timesteps 1-D of length B or 2B, equal halves; 0 < gamma <= 1.
    yield "timesteps", ValueError, lambda: fastpref.dense_dpo_loss(p, r, t, ts[:, None])
    yield "timesteps", ValueError, lambda: fastpref.dense_dpo_loss(p, r, t, torch.tensor([1, 2, 3], device=device))
    yield "timesteps", ValueError, lambda: fastpref.dense_dpo_loss(p, r, t, ts[:1])
    yield (
        "timesteps",
        ValueError,
        lambda: fastpref.dense_dpo_loss(p, r, t, torch.tensor([10, 500, 10, 501], device=device)),
    )
    yield "timesteps", EITHER, lambda: fastpref.dense_dpo_loss(p, r, t, [10, 500])
    for bad in (0.0, -0.5, 1.0000001, 2.0, NAN, INF):
        yield "gamma", ValueError, lambda bad=bad: fastpref.dense_dpo_loss(p, r, t, ts, gamma=bad)
    yield "model_pred", ValueError, lambda: fastpref.dense_dpo_loss(*odd, ts)
    # KTO: labels 1-D of length N.
    yield "labels", ValueError, lambda: fastpref.kto_loss(p, r, t, labels[:3])
    yield "labels", ValueError, lambda: fastpref.kto_loss(p, r, t, labels[:, None])
    yield "labels", ValueError, lambda: fastpref.kto_loss(p, r, t, torch.tensor(1, device=device))
    yield "labels", EITHER, lambda: fastpref.kto_loss(p, r, t, [1, 0, 1, 0])
    yield "ref_pred", ValueError, lambda: fastpref.kto_loss(p, r[:3], t, labels)
    # MaPO: paired, no ref_pred.
    yield "model_pred", ValueError, lambda: fastpref.mapo_loss(odd[0], odd[2])
    yield "target", ValueError, lambda: fastpref.mapo_loss(p, t[:2])
    # SDPO: 0 <= mu <= 1, eps >= 0, max_scale >= 0, base in dpo/dspo/dmpo.
    for bad in (-0.1, 1.1, NAN):
        yield "mu", ValueError, lambda bad=bad: fastpref.sdpo_loss(p, r, t, mu=bad)
    for bad in (-1e-12, NAN):
        yield "eps", ValueError, lambda bad=bad: fastpref.sdpo_loss(p, r, t, eps=bad)
    for bad in (-1.0, NAN):
        yield "max_scale", ValueError, lambda bad=bad: fastpref.sdpo_loss(p, r, t, max_scale=bad)
    yield "base", ValueError, lambda: fastpref.sdpo_loss(p, r, t, base="ipo")
    yield "dspo_variant", ValueError, lambda: fastpref.sdpo_loss(p, r, t, base="dspo", dspo_variant="sd3")
    yield "model_pred", ValueError, lambda: fastpref.sdpo_loss(*odd)
    yield "model_pred", ValueError, lambda: fastpref.dmpo_loss(*odd)
    # A non-finite or non-positive β, for every new function.
    calls = {
        "rpo": lambda beta: fastpref.rpo_loss(p, r, t, beta=beta),
        "rpo_diagonal": lambda beta: fastpref.rpo_diagonal_loss(p, r, t, beta=beta),
        "sspo": lambda beta: fastpref.sspo_loss(p, r, t, beta=beta),
        "dense": lambda beta: fastpref.dense_dpo_loss(p, r, t, ts, beta=beta),
        "kto": lambda beta: fastpref.kto_loss(p, r, t, labels, beta=beta),
        "mapo": lambda beta: fastpref.mapo_loss(p, t, beta=beta),
        "sdpo": lambda beta: fastpref.sdpo_loss(p, r, t, beta=beta),
        "dmpo": lambda beta: fastpref.dmpo_loss(p, r, t, beta=beta),
    }
    for fn in calls.values():
        for bad in (NAN, INF, -INF):
            yield "beta", ValueError, lambda fn=fn, bad=bad: fn(bad)


@pytest.mark.parametrize("index", range(len(bad_input_case_ids(cases))), ids=bad_input_case_ids(cases))
def test_bad_input_raises_naming_the_argument(index, device, no_launch):
    assert_bad_input_case(cases, index, device)


def test_no_launch_fixture_catches_a_launch(device, no_launch):
    """The fixture is live: a valid call must hit it."""
    p, r, t = make_inputs((4, 3, 5, 5), torch.float32, device, 0)
    with pytest.raises(AssertionError, match="launched before validation"):
        fastpref.diffusion_dpo_loss(p, r, t)


def test_boundary_values_are_accepted(device):
    """gamma = 1, mu = 0 and 1, eps = 0, max_scale = 0, a 2B timesteps vector with equal
    halves, labels of any dtype, kl_baseline as a float or a 0-dim tensor: all legal."""
    p, r, t = make_inputs((4, 3, 5, 5), torch.float32, device, 0)
    ts = torch.tensor([10, 500, 10, 500], device=device)
    results = [
        fastpref.dense_dpo_loss(p, r, t, ts, gamma=1.0),
        fastpref.dense_dpo_loss(p, r, t, ts.float()[:2], gamma=0.5),
        fastpref.sdpo_loss(p, r, t, mu=0.0),
        fastpref.sdpo_loss(p, r, t, mu=1.0, eps=0.0, max_scale=0.0),
        fastpref.kto_loss(p, r, t, torch.tensor([True, False, True, True], device=device), kl_baseline=0.0),
        fastpref.kto_loss(
            p, r, t, torch.tensor([0.5, 0.0, -1.0, 0.0], device=device), kl_baseline=torch.tensor(1e-3, device=device)
        ),
        fastpref.kto_loss(p[:1], r[:1], t[:1], torch.tensor([0], device=device)),
    ]
    for loss, metrics in results:
        assert torch.isfinite(loss) and "loss" in metrics


SIGNATURES = {  # docs/methods.md §2.4-2.10, written out: (positional parameters, keyword-only parameters with defaults)
    "rpo_loss": (("model_pred", "ref_pred", "target"), dict(emb_w=None, emb_l=None, beta=5000.0, tau=0.5)),
    "rpo_diagonal_loss": (("model_pred", "ref_pred", "target"), dict(beta=5000.0, diagonal_weight=0.8)),
    "sspo_loss": (("model_pred", "ref_pred", "target"), dict(beta=5000.0, criterion="indicator")),
    "dense_dpo_loss": (
        ("model_pred", "ref_pred", "target", "timesteps"),
        dict(beta=5000.0, gamma=0.9, num_inference_steps=50, num_train_timesteps=1000, normalize=True),
    ),
    "kto_loss": (
        ("model_pred", "ref_pred", "target", "labels"),
        dict(beta=1000.0, lambda_d=1.0, lambda_u=1.0, kl_baseline=None),
    ),
    "mapo_loss": (("model_pred", "target"), dict(beta=0.1, snr_value=0.5, num_train_timesteps=1000)),
    "sdpo_loss": (
        ("model_pred", "ref_pred", "target"),
        dict(
            beta=5000.0,
            mu=0.9,
            base="dpo",
            safeguard=True,
            eps=1e-9,
            max_scale=1.0,
            dspo_variant="sd15",
            sdxl_threshold=0.1,
            dmpo_alpha=0.01,
        ),
    ),
    "dmpo_loss": (("model_pred", "ref_pred", "target"), dict(beta=2000.0, alpha=0.01)),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature_and_defaults_match_the_spec(name):
    params = inspect.signature(getattr(fastpref, name)).parameters.values()
    positional = tuple(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    keyword = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert all(p.default is inspect.Parameter.empty for p in params if p.name in positional), name
    assert (positional, keyword) == SIGNATURES[name]
    for key, value in keyword.items():  # 5000.0 == 5000, but the types should agree too
        assert type(value) is type(SIGNATURES[name][1][key]), f"{name}: {key} default {value!r}"
