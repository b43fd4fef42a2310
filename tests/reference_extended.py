"""A float64 implementation of docs/methods.md §2.4-2.10 (RPO, RPO-diagonal, SSPO, dense-reward DPO, KTO,
MaPO, SDPO, DMPO), written plainly from the formulas (no cancellation-free forms, no fused
tricks); gradients come from autograd. Same conventions as `reference.py`: call it on float64
CPU copies of the inputs (see `helpers.run_reference`); every function returns
`(loss, metrics)` with docs/methods.md's metric keys, plus "_name" entries: the float64 decision
values (in inside units) whose sign an accuracy metric `name` counts (see helpers_extended)."""

import math

import torch
import torch.nn.functional as F
from reference import pair_errors, row_mse, shared_metrics


def _acc(x):
    """Strict accuracy mean 1[x > 0] as a float64 scalar."""
    return (x > 0).double().mean()


def _mse_pair(m_w, m_l, r_w, r_l):
    s = shared_metrics(m_w, m_l, r_w, r_l)
    return {"model_mse": s["model_mse"], "ref_mse": s["ref_mse"]}


# ---------------------------------------------------------------- §2.4 Diffusion-RPO


def rpo_weights(emb_w, emb_l, B, tau):
    """[B, B] W: softmax_j(-(1 - cos(emb_w[i], emb_l[j])) / tau), or all ones without emb_w."""
    if emb_w is None:
        return torch.ones(B, B, dtype=torch.float64)
    if emb_l is None:
        emb_l = emb_w
    ew = F.normalize(emb_w.detach().double().cpu(), dim=1, eps=1e-12)  # constants (docs/methods.md §1)
    el = F.normalize(emb_l.detach().double().cpu(), dim=1, eps=1e-12)
    cos = ew @ el.T
    return torch.softmax(-(1 - cos) / tau, dim=1)


def rpo_logits(model_pred, ref_pred, target):
    """ell_ij = rho_w,i - rho_l,j with rho_k = -(m_k - r_k): [B, B]; also the four [B] errors."""
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    rho_w, rho_l = -(m_w - r_w), -(m_l - r_l)
    return rho_w[:, None] - rho_l[None, :], (m_w, m_l, r_w, r_l)


def rpo(model_pred, ref_pred, target, emb_w=None, emb_l=None, beta=5000.0, tau=0.5):
    ell, errs = rpo_logits(model_pred, ref_pred, target)
    B = ell.shape[0]
    W = rpo_weights(emb_w, emb_l, B, tau)
    loss = F.softplus(-0.5 * beta * W * ell).mean()
    metrics = {
        "loss": loss,
        "implicit_acc": _acc(torch.diagonal(ell)),
        "pair_acc_all": _acc(ell),
        "weights": W,
        "diag_weight_mean": torch.diagonal(W).mean(),
        **_mse_pair(*errs),
        "_implicit_acc": 0.5 * beta * torch.diagonal(ell),
        "_pair_acc_all": 0.5 * beta * ell,
    }
    return loss, metrics


def rpo_diagonal(model_pred, ref_pred, target, beta=5000.0, diagonal_weight=0.8):
    ell, _ = rpo_logits(model_pred, ref_pred, target)
    B = ell.shape[0]
    L = F.softplus(-0.5 * beta * ell)
    eye = torch.eye(B, dtype=torch.bool)
    off = torch.where(eye, torch.zeros_like(L), L).sum(1) / (B - 1)
    loss = (diagonal_weight * torch.diagonal(L) + (1 - diagonal_weight) * off).mean()
    return loss, {
        "loss": loss,
        "implicit_acc": _acc(torch.diagonal(ell)),
        "_implicit_acc": 0.5 * beta * torch.diagonal(ell),
    }


# ---------------------------------------------------------------- §2.5 SSPO / SePPO


def sspo(model_pred, ref_pred, target, beta=5000.0, criterion="indicator"):
    m_w, m_s, r_w, r_s = pair_errors(model_pred, ref_pred, target)
    a = (r_w - m_w).detach()
    if criterion == "indicator":
        c = (a > 0).double()
    elif criterion == "sign":
        c = torch.sign(a)
    else:
        raise ValueError(criterion)
    inside = -0.5 * beta * ((m_w - r_w) - c * (m_s - r_s))
    loss = F.softplus(-inside).mean()
    metrics = {
        "loss": loss,
        "dpo_fraction": (c > 0).double().mean(),
        "criterion": c,
        "implicit_acc": _acc(inside),
        "model_mse_w": m_w.mean(),
        "ref_mse_w": r_w.mean(),
        "_implicit_acc": inside,
        "_dpo_fraction": 0.5 * beta * a,
    }
    return loss, metrics


# ---------------------------------------------------------------- §2.6 dense-reward discount


def dense_step_index(timesteps, num_inference_steps=50, num_train_timesteps=1000):
    """k(t) = clamp(floor((T - 1 - t) * K / T), 0, K - 1) in float64, for int or float t."""
    T, K = num_train_timesteps, num_inference_steps
    t = timesteps.double().cpu()
    return torch.clamp(torch.floor((T - 1 - t) * K / T), 0, K - 1)


def dense_weights(timesteps, gamma=0.9, num_inference_steps=50, num_train_timesteps=1000, normalize=True):
    """w(t) = gamma^k(t), times K / sum_j gamma^j when normalised; float64 [len(timesteps)]."""
    k = dense_step_index(timesteps, num_inference_steps, num_train_timesteps)
    w = torch.pow(torch.tensor(float(gamma), dtype=torch.float64), k)
    if normalize:
        K = num_inference_steps
        w = K * w / sum(float(gamma) ** j for j in range(K))
    return w


def dense_dpo(
    model_pred,
    ref_pred,
    target,
    timesteps,
    beta=5000.0,
    gamma=0.9,
    num_inference_steps=50,
    num_train_timesteps=1000,
    normalize=True,
):
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    B = m_w.shape[0]
    w = dense_weights(timesteps[:B], gamma, num_inference_steps, num_train_timesteps, normalize)
    inside = -0.5 * beta * w * ((m_w - m_l) - (r_w - r_l))
    loss = F.softplus(-inside).mean()
    metrics = {
        "loss": loss,
        "implicit_acc": _acc(inside),
        "step_weight_mean": w.mean(),
        **_mse_pair(m_w, m_l, r_w, r_l),
        "_implicit_acc": inside,
    }
    return loss, metrics


# ---------------------------------------------------------------- §2.7 Diffusion-KTO


def kto(model_pred, ref_pred, target, labels, beta=1000.0, lambda_d=1.0, lambda_u=1.0, kl_baseline=None):
    m = row_mse(model_pred, target)
    r = row_mse(ref_pred, target)
    g = r - m
    if kl_baseline is None:
        z = torch.clamp(g.detach().mean(), min=0.0)
    else:
        z = torch.as_tensor(kl_baseline, dtype=torch.float64).detach().cpu().reshape(())
    good = labels.cpu() != 0
    one = torch.ones((), dtype=torch.float64)
    s = torch.where(good, one, -one)
    lam = torch.where(good, float(lambda_d) * one, float(lambda_u) * one)  # float64, not the default dtype
    x = s * beta * (g - z)
    loss = (lam * (1 - torch.sigmoid(x))).mean()
    return loss, {"loss": loss, "kl": z, "acc": _acc(x), "model_mse": m.mean(), "_acc": x}


# ---------------------------------------------------------------- §2.8 MaPO


def mapo_h(x):
    """h(x) = x / (e^x - 1) for x > 0, as x e^-x / (1 - e^-x) (no overflow for large x). Below
    1e-3 its Taylor series to x^6 (truncation < 1e-30): autograd through the closed form's
    quotient rule cancels terms of size 1/x there, losing ~1e-16 / x relative in h'."""
    closed = x * torch.exp(-x) / -torch.expm1(-torch.where(x < 1e-3, torch.ones_like(x), x))
    x2 = x * x
    series = 1 - x / 2 + x2 / 12 - x2 * x2 / 720 + x2 * x2 * x2 / 30240
    return torch.where(x < 1e-3, series, closed)


def mapo(model_pred, target, beta=0.1, snr_value=0.5, num_train_timesteps=1000):
    m = row_mse(model_pred, target)
    B = m.shape[0] // 2
    m_w, m_l = m[:B], m[B:]
    f_w, f_l = mapo_h(snr_value * m_w), mapo_h(snr_value * m_l)
    u = num_train_timesteps * (f_w - f_l)
    or_loss = -beta * F.logsigmoid(u).mean()
    loss = m_w.mean() + or_loss
    metrics = {
        "loss": loss,
        "win_score": f_w.mean(),
        "lose_score": f_l.mean(),
        "or_loss": or_loss,
        "model_mse_w": m_w.mean(),
        "model_mse_l": m_l.mean(),
        "margin_acc": _acc(f_w - f_l),
        "_margin_acc": u,
    }
    return loss, metrics


# ---------------------------------------------------------------- §2.9 SDPO and §2.10 DMPO


def sdpo_scale(model_pred, target, mu=0.9, eps=1e-9, max_scale=1.0):
    """(lambda, num, den, proxy cos) from the detached policy errors, K = B * n (local batch)."""
    e = (model_pred - target).detach().flatten(1)
    B, n = e.shape[0] // 2, e.shape[1]
    e_w, e_l = e[:B], e[B:]
    K = B * n
    num = 4 * (e_w * e_w).sum() / K**2
    den = 4 * (e_w * e_l).sum() / K**2
    s_ll = 4 * (e_l * e_l).sum() / K**2
    if den > 0:
        lam = torch.clamp((1 - mu) * num / (den + eps), 0.0, max_scale)
    else:
        lam = torch.tensor(float(max_scale), dtype=torch.float64)
    return lam, num, den, den / torch.sqrt(num * s_ll)


def dspo_objective(inside, model_pred, ref_pred, target, beta, variant="sd15", sdxl_threshold=0.1):
    """The DSPO loss of docs/methods.md §2.3 on a given (gradient-carrying) inside; returns (loss, branch)."""
    B = inside.shape[0]
    g = torch.sigmoid(-inside)
    shape = (B,) + (1,) * (model_pred.dim() - 1)
    e = model_pred[:B] - target[:B]
    d = model_pred[:B] - ref_pred[:B]
    if variant == "sd15":
        return ((e - beta * g.view(shape) * d) ** 2).flatten(1).mean(1).mean(), 0
    if variant != "sdxl":
        raise ValueError(variant)
    q = (d**2).mean().detach()
    if q >= sdxl_threshold:
        return ((g.view(shape) * d) ** 2).flatten(1).mean(1).mean(), 1
    return (g**2).mean(), 2


def dmpo_objective(inside, alpha=0.01):
    """mean_i KL(Bernoulli(sigmoid(inside_i)) || Bernoulli(q)), q = clamp(1 - alpha, 1e-6, 1 - 1e-6)."""
    q = min(max(1.0 - alpha, 1e-6), 1.0 - 1e-6)
    p = torch.sigmoid(inside)
    log_p, log_1mp = -F.softplus(-inside), -F.softplus(inside)
    return (p * (log_p - math.log(q)) + (1 - p) * (log_1mp - math.log(1 - q))).mean()


def sdpo(
    model_pred,
    ref_pred,
    target,
    beta=5000.0,
    mu=0.9,
    base="dpo",
    safeguard=True,
    eps=1e-9,
    max_scale=1.0,
    dspo_variant="sd15",
    sdxl_threshold=0.1,
    dmpo_alpha=0.01,
):
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    if safeguard:
        lam, num, den, cos = sdpo_scale(model_pred, target, mu, eps, max_scale)
    else:
        lam = torch.tensor(1.0, dtype=torch.float64)
    # Value m_l exactly, gradient lam times that of m_l.
    m_l_tilde = m_l.detach() + lam * (m_l - m_l.detach())
    inside = -0.5 * beta * ((m_w - m_l_tilde) - (r_w - r_l))
    branch = None
    if base == "dpo":
        loss = F.softplus(-inside).mean()
    elif base == "dspo":
        loss, branch = dspo_objective(inside, model_pred, ref_pred, target, beta, dspo_variant, sdxl_threshold)
    elif base == "dmpo":
        loss = dmpo_objective(inside, dmpo_alpha)
    else:
        raise ValueError(base)
    metrics = {
        "loss": loss,
        "implicit_acc": _acc(inside),
        **_mse_pair(m_w, m_l, r_w, r_l),
        "win_diff": (m_w - r_w).mean(),
        "lose_diff": (m_l - r_l).mean(),
        "loser_grad_scale": lam,
        "inside_term": inside,
        "_implicit_acc": inside,
    }
    if safeguard:
        metrics.update(safeguard_num=num, safeguard_den=den, safeguard_proxy_grad_cos=cos)
    if branch is not None:
        metrics["dspo_branch"] = torch.tensor(branch)
    return loss, metrics


def dmpo(model_pred, ref_pred, target, beta=2000.0, alpha=0.01):
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    loss = dmpo_objective(inside, alpha)
    return loss, {"loss": loss, "implicit_acc": _acc(inside), **_mse_pair(m_w, m_l, r_w, r_l), "_implicit_acc": inside}
