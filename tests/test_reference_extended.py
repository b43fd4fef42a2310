"""The float64 reference of §2.4-2.10 checked on its own (no kernels): against `reference.py`
where docs/methods.md states a reduction, and its autograd gradients against the closed forms of
docs/methods.md §3 (μ_k = ∂L/∂m_k, gradient (2/n) μ_k (p - t)), an independent derivation."""

import math

import pytest
import reference
import reference_extended as ref
import torch
from helpers import make_inputs
from helpers_extended import correlated_inputs

F64 = torch.float64


def inputs64(shape=(6, 3, 7, 5), seed=0, scale=0.01):
    return make_inputs(shape, F64, "cpu", seed, scale)


def grad_of(fn, model, *args, **kw):
    leaf = model.clone().requires_grad_(True)
    loss, metrics = fn(leaf, *args, **kw)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def grad_from_mu(model, target, mu):
    """Spec §3: ∂L/∂p = (2/n) μ_k (p - t) for a loss that sees row k only through m_k."""
    n = model[0].numel()
    return (2.0 / n) * mu.view((-1,) + (1,) * (model.dim() - 1)) * (model - target)


def assert_same(a, b, rtol=1e-10):
    err = float((a - b).detach().abs().max())
    assert err <= rtol * float(b.detach().abs().max()) + 1e-300, f"off by {err:.3e}"


def test_rpo_one_pair_and_sdpo_without_safeguard_reduce_to_dpo():
    p, r, t = inputs64((2, 3, 7, 5))
    dloss, _, dgrad = grad_of(reference.dpo, p, r, t)
    for fn, kw in [
        (ref.rpo, {}),
        (ref.rpo, dict(emb_w=torch.randn(1, 4, dtype=F64))),
        (ref.sdpo, dict(safeguard=False)),
        (ref.dense_dpo, dict(gamma=1.0)),
    ]:
        args = (torch.tensor([7]),) if fn is ref.dense_dpo else ()
        loss, _, grad = grad_of(fn, p, r, t, *args, **kw)
        assert_same(loss, dloss)
        assert_same(grad, dgrad)


@pytest.mark.parametrize("variant,beta", [("sd15", 0.001), ("sd15", 2.0), ("sdxl", 5000.0)])
def test_sdpo_dspo_base_without_safeguard_is_dspo(variant, beta):
    p, r, t = inputs64(scale=0.3 if variant == "sd15" else 0.01)
    for threshold in (1e-6, 10.0):
        bloss, bm, bgrad = grad_of(reference.dspo, p, r, t, beta=beta, variant=variant, sdxl_threshold=threshold)
        loss, m, grad = grad_of(
            ref.sdpo, p, r, t, beta=beta, base="dspo", safeguard=False, dspo_variant=variant, sdxl_threshold=threshold
        )
        assert_same(loss, bloss)
        assert_same(grad, bgrad)
        assert int(m["dspo_branch"]) == int(bm["sdxl_branch"])


def test_sdpo_gradient_edit():
    """Value unchanged, winner rows unchanged, loser rows times λ."""
    p, r, t = correlated_inputs((6, 3, 7, 5), F64, "cpu", 1, 0.01, 0.5)
    for base in ("dpo", "dspo", "dmpo"):
        bloss, _, bgrad = grad_of(ref.sdpo, p, r, t, base=base, beta=50.0, safeguard=False)
        loss, m, grad = grad_of(ref.sdpo, p, r, t, base=base, beta=50.0, mu=0.9)
        lam = m["loser_grad_scale"]
        assert 0 < float(lam) < 1
        assert float(loss) == float(bloss)
        assert_same(grad[:3], bgrad[:3])
        assert_same(grad[3:], lam * bgrad[3:])


def test_dmpo_gradient_closed_form():
    """μ_w = -(β/(2B)) p (1 - p) (inside - logit q), μ_l = -μ_w."""
    p, r, t = inputs64()
    beta, alpha, B = 2000.0, 0.05, 3
    _, m, grad = grad_of(ref.dmpo, p, r, t, beta=beta, alpha=alpha)
    inside = m["_implicit_acc"]
    q = 1 - alpha
    prob = torch.sigmoid(inside)
    mu_w = -(beta / (2 * B)) * prob * (1 - prob) * (inside - math.log(q / (1 - q)))
    assert_same(grad, grad_from_mu(p, t, torch.cat([mu_w, -mu_w])))


def test_sspo_gradient_closed_form():
    """μ_w = β σ(-inside) / (2B), μ_s = -c β σ(-inside) / (2B)."""
    p, r, t = inputs64(seed=3)
    for criterion in ("indicator", "sign"):
        _, m, grad = grad_of(ref.sspo, p, r, t, criterion=criterion)
        sbar = torch.sigmoid(-m["_implicit_acc"])
        mu_w = 5000.0 * sbar / 6
        assert_same(grad, grad_from_mu(p, t, torch.cat([mu_w, -m["criterion"] * mu_w])))


def test_rpo_gradient_closed_form():
    """μ_w,i = (β/(2B²)) Σ_j W_ij σ(-u_ij), μ_l,j = -(β/(2B²)) Σ_i W_ij σ(-u_ij)."""
    p, r, t = inputs64((8, 3, 7, 5), seed=4)
    beta, B = 5000.0, 4
    _, m, grad = grad_of(ref.rpo, p, r, t, emb_w=torch.randn(B, 6, dtype=F64), beta=beta)
    W = m["weights"]
    u = m["_pair_acc_all"] * W  # 0.5 β W ℓ
    s = W * torch.sigmoid(-u) * beta / (2 * B * B)
    assert_same(grad, grad_from_mu(p, t, torch.cat([s.sum(1), -s.sum(0)])))


def test_kto_gradient_closed_form():
    """μ_k = λ_k s_k β σ(x_k) σ(-x_k) / N (z constant)."""
    p, r, t = inputs64((5, 3, 7, 5), seed=5)
    labels = torch.tensor([1, 0, 2, 0, 1])
    _, m, grad = grad_of(ref.kto, p, r, t, labels, beta=1000.0, lambda_d=2.0, lambda_u=0.5)
    x = m["_acc"]
    s = torch.where(labels != 0, 1.0, -1.0).double()
    lam = torch.where(labels != 0, 2.0, 0.5).double()
    assert_same(grad, grad_from_mu(p, t, lam * s * 1000.0 * torch.sigmoid(x) * torch.sigmoid(-x) / 5))


def test_mapo_gradient_closed_form_and_h():
    """μ_w = 1/B - (βT/B) σ(-u) f'(m_w), μ_l = (βT/B) σ(-u) f'(m_l), f'(m) = s h'(s m); h against
    its series near 0 and the plain formula elsewhere."""
    x = torch.tensor([1e-12, 1e-6, 1e-3], dtype=F64)
    assert_same(ref.mapo_h(x), 1 - x / 2 + x**2 / 12, 1e-12)
    x = torch.tensor([0.0011, 0.1, 1.0, 5.0, 30.0], dtype=F64)
    assert_same(ref.mapo_h(x), x / (torch.exp(x) - 1), 1e-12)
    # h' on both sides of the series cut: -1/2 + x/6 - x^3/180 + x^5/5040 (truncation < 1e-22).
    x = torch.tensor([1e-9, 1e-6, 9.9e-4, 1.01e-3, 3e-3], dtype=F64, requires_grad=True)
    ref.mapo_h(x).sum().backward()
    xd = x.detach()
    assert_same(x.grad, -0.5 + xd / 6 - xd**3 / 180 + xd**5 / 5040, 1e-12)
    p, _, t = inputs64(seed=6, scale=0.3)
    beta, s, T, B = 0.5, 2.0, 1000, 3
    _, m, grad = grad_of(ref.mapo, p, t, beta=beta, snr_value=s, num_train_timesteps=T)
    mse = ((p - t) ** 2).flatten(1).mean(1)
    xs = s * mse
    hprime = (torch.expm1(xs) - xs * torch.exp(xs)) / torch.expm1(xs) ** 2
    sig = torch.sigmoid(-m["_margin_acc"])
    mu_w = 1 / B - (beta * T / B) * sig * s * hprime[:B]
    mu_l = (beta * T / B) * sig * s * hprime[B:]
    assert_same(grad, grad_from_mu(p, t, torch.cat([mu_w, mu_l])), 1e-8)


def test_dense_weights_table_and_normalisation():
    ks = ref.dense_step_index(torch.tensor([999, 981, 980, 979, 1, 0]))
    assert ks.tolist() == [0, 0, 0, 1, 49, 49]
    w = ref.dense_weights(torch.arange(1000), gamma=0.9)
    assert abs(float(w.mean()) - 1.0) < 1e-12
