"""Eager PyTorch loss blocks that fastpref is benchmarked against.

Two kinds of block live here:

* ``diffusers_*`` / ``official_*``: the loss block of an upstream trainer, re-implemented
  with the same sequence of PyTorch ops and the same upcasts (or lack of them) as the
  upstream script, so that time, memory and kernel counts match what those trainers pay:

  - ``diffusers_dpo``: huggingface/diffusers
    ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (upcasts both
    errors to float32 through ``F.mse_loss(x.float(), y.float(), reduction="none")``;
    ``beta_dpo`` is the script's, i.e. half of docs/methods.md's β, no 0.5 factor).
  - ``official_dpo`` / ``official_sft``: SalesforceAIResearch/DiffusionDPO ``train.py``
    (DPO errors in the input dtype, no upcast; SFT upcasts).
  - ``official_dspo``: huaishengzhu/DSPO ``train.py`` (input dtype; the SDXL variant decides
    its branch with a Python ``if`` on a tensor, i.e. a host sync, as upstream does).
  - ``flow_grpo_dpo``: yifan123/flow_grpo ``scripts/train_sd3_dpo.py`` (float32 upcasts,
    per-row means, the official β; its ten logged means).
  - ``simpletuner_flow_dpo``: bghira/SimpleTuner's Flow-DPO distiller
    (``FlowDPODistiller.compute_distill_loss``, fixed β, no mask): float32 upcasts, per-row
    **sums** over the win and lose halves as separate tensors, β = fastpref's β / N so that the
    loss is the same. Upstream turns each of its logs into a Python float (a host sync per key)
    and, with its default automatic β, reads the margin back every step; neither is timed here.

  Upstream reduces with ``mean(dim=[1, 2, 3])`` (4-D latents); these blocks reduce over all
  trailing dims so that 5-D video latents work (same numbers on 4-D inputs).

* ``spec_*``: straightforward eager versions of the formulas of ``spec/losses.md`` for the
  methods that have no upstream trainer (or whose trainer is not reproduced here). They
  upcast to float32 as docs/methods.md says and are written the way a user would write them.

Every block takes ``(model_pred, ref_pred, target, ...)`` (``(model_pred, target, ...)`` for
reference-free methods) and returns ``(loss, metrics)`` where ``metrics`` holds the tensors
the trainer logs (kept as tensors: reading them back is the trainer's logging cost, not the
loss block's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _row_dims(x: torch.Tensor) -> list[int]:
    """All dims but the leading (batch) one."""
    return list(range(1, x.ndim))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-row vector ``[N]`` so that it broadcasts against ``like`` ``[N, ...]``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------------------
# Upstream trainer blocks
# --------------------------------------------------------------------------------------


def diffusers_dpo(model_pred, ref_pred, target, *, beta_dpo=2500.0, loss_type="sigmoid"):
    """Diffusion-DPO block of the diffusers SD1.5 example (``beta_dpo`` = spec β / 2).

    Returns ``(loss, {"raw_model_loss", "ref_loss", "implicit_acc"})``.
    """
    dims = _row_dims(model_pred)
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = F.mse_loss(ref_pred.detach().float(), target.float(), reduction="none").mean(dim=dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()
    logits = ref_diff - model_diff
    if loss_type == "sigmoid":
        loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta_dpo * logits).mean()
    elif loss_type == "ipo":
        # upstream reads an undefined ``args.beta`` here; the intended value is beta_dpo
        loss = ((logits - 1 / (2 * beta_dpo)) ** 2).mean()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc = implicit_acc + 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, {"raw_model_loss": raw_model_loss, "ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}


def official_dpo(model_pred, ref_pred, target, *, beta_dpo=5000.0):
    """Diffusion-DPO block of SalesforceAIResearch/DiffusionDPO ``train.py`` (no upcast).

    Returns ``(loss, {"raw_model_loss", "raw_ref_loss", "implicit_acc"})``.
    """
    dims = _row_dims(model_pred)
    model_losses = (model_pred - target).pow(2).mean(dim=dims)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred.detach() - target).pow(2).mean(dim=dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, {"raw_model_loss": raw_model_loss, "raw_ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}


def official_sft(model_pred, target):
    """SFT block of SalesforceAIResearch/DiffusionDPO ``train.py --sft`` (float32 MSE)."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return loss, {}


def official_dspo(model_pred, ref_pred, target, *, beta_dpo=0.001, sdxl=False, sdxl_threshold=0.1):
    """DSPO block of huaishengzhu/DSPO ``train.py`` (input dtype; SDXL branch on the host).

    Returns ``(loss, {"raw_model_loss", "raw_ref_loss", "implicit_acc"})``.
    """
    dims = _row_dims(model_pred)
    model_diff_w, model_diff_l = (model_pred - target).chunk(2)
    model_losses_w = model_diff_w.pow(2).mean(dim=dims)
    model_losses_l = model_diff_l.pow(2).mean(dim=dims)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_pred = ref_pred.detach()
        ref_losses = (ref_pred - target).pow(2).mean(dim=dims)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    pred2, _ = (model_pred - ref_pred).chunk(2)
    weight = _bcast(1 - F.sigmoid(inside_term), pred2)
    if sdxl:
        if pred2.pow(2).mean(dim=dims).mean() >= sdxl_threshold:  # host sync, as upstream
            loss = (weight * pred2).pow(2).mean(dim=dims).mean()
        else:
            loss = weight.pow(2).mean(dim=dims).mean()
    else:
        loss = (model_diff_w - beta_dpo * weight * pred2).pow(2).mean(dim=dims).mean()
    return loss, {"raw_model_loss": raw_model_loss, "raw_ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}


def flow_grpo_dpo(model_pred, ref_pred, target, *, beta=100.0):
    """The DPO loss lines of flow_grpo ``train_sd3_dpo.py`` (β official, per-row means).

    Returns ``(loss, {the script's info keys})``.
    """
    rows, bsz = target.shape[0], target.shape[0] // 2
    theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(rows, -1).mean(dim=1)
    ref_mse = ((ref_pred.detach().float() - target.float()) ** 2).reshape(rows, -1).mean(dim=1)
    w_diff = theta_mse[:bsz] - ref_mse[:bsz]
    l_diff = theta_mse[bsz:] - ref_mse[bsz:]
    w_l_diff = w_diff - l_diff
    inside_term = -0.5 * beta * w_l_diff
    loss = (-F.logsigmoid(inside_term)).mean()
    info = {
        "model_w_err": theta_mse[:bsz].mean(),
        "model_l_err": theta_mse[bsz:].mean(),
        "ref_w_err": ref_mse[:bsz].mean(),
        "ref_l_err": ref_mse[bsz:].mean(),
        "w_diff": w_diff.mean(),
        "l_diff": l_diff.mean(),
        "w_l_diff": w_l_diff.mean(),
        "inside_term": inside_term.mean(),
        "implicit_acc": (inside_term > 0).sum().float() / inside_term.size(0),
    }
    return loss, info


def simpletuner_flow_dpo(model_pred, ref_pred, target, *, fastpref_beta=5000.0):
    """SimpleTuner's Flow-DPO loss block, ``norm_type="sum"``, fixed β = fastpref_beta / N.

    The win and lose halves enter as separate tensors (views), as the distiller has them.
    Returns ``(loss, {the distiller's flow_dpo_* keys, as tensors})``.
    """
    policy_win, policy_lose = model_pred.chunk(2)
    ref_win, ref_lose = ref_pred.detach().chunk(2)
    win_target, lose_target = target.chunk(2)
    beta = torch.tensor(fastpref_beta / model_pred[0].numel(), dtype=torch.float32, device=model_pred.device)

    def error(prediction, tgt):
        return (prediction.float() - tgt.float()).pow(2).sum(dim=_row_dims(prediction))

    policy_win_err, policy_lose_err = error(policy_win, win_target), error(policy_lose, lose_target)
    with torch.no_grad():
        ref_win_err, ref_lose_err = error(ref_win, win_target), error(ref_lose, lose_target)
    win_adv = ref_win_err - policy_win_err
    lose_adv = policy_lose_err - ref_lose_err
    margin = win_adv + lose_adv
    logits = 0.5 * beta * margin.float()
    dpo_loss = -F.logsigmoid(logits).mean()
    logs = {
        "flow_dpo_beta": beta,
        "flow_dpo_margin": margin.detach().mean(),
        "flow_dpo_win_adv": win_adv.detach().mean(),
        "flow_dpo_lose_adv": lose_adv.detach().mean(),
        "flow_dpo_policy_win_err": policy_win_err.detach().mean(),
        "flow_dpo_policy_lose_err": policy_lose_err.detach().mean(),
        "flow_dpo_ref_win_err": ref_win_err.mean(),
        "flow_dpo_ref_lose_err": ref_lose_err.mean(),
        "flow_dpo_negative_margin_pct": (margin.detach() < 0).float().mean() * 100.0,
        "flow_dpo_gradient_factor": torch.sigmoid(-logits.detach()).mean(),
    }
    return dpo_loss, logs


# --------------------------------------------------------------------------------------
# Eager versions of docs/methods.md formulas (float32 compute, as docs/methods.md prescribes)
# --------------------------------------------------------------------------------------


def _errors(model_pred, ref_pred, target):
    """Per-row float32 errors ``m`` (with grad) and ``r`` (constant)."""
    dims = _row_dims(model_pred)
    t = target.float()
    m = (model_pred.float() - t).pow(2).mean(dim=dims)
    with torch.no_grad():
        r = (ref_pred.detach().float() - t).pow(2).mean(dim=dims)
    return m, r


def _dpo_inside(m, r, beta):
    m_w, m_l = m.chunk(2)
    r_w, r_l = r.chunk(2)
    return -0.5 * beta * ((m_w - m_l) - (r_w - r_l))


def spec_dpo(model_pred, ref_pred, target, *, beta=5000.0):
    """Diffusion-DPO sigmoid (docs/methods.md §2.1), float32."""
    m, r = _errors(model_pred, ref_pred, target)
    inside = _dpo_inside(m, r, beta)
    loss = F.softplus(-inside).mean()
    return loss, {"implicit_acc": (inside > 0).float().mean(), "model_mse": m.mean(), "ref_mse": r.mean()}


def spec_dense_dpo(
    model_pred,
    ref_pred,
    target,
    timesteps,
    *,
    beta=5000.0,
    gamma=0.9,
    num_inference_steps=50,
    num_train_timesteps=1000,
    normalize=True,
):
    """Dense-reward temporally discounted DPO (docs/methods.md §2.6), float32."""
    T, K = num_train_timesteps, num_inference_steps
    B = model_pred.shape[0] // 2
    t = timesteps[:B].to(torch.float64)
    k = torch.clamp(torch.floor((T - 1 - t) * K / T), 0, K - 1)
    w = gamma**k
    if normalize:
        w = w * (K / sum(gamma**j for j in range(K)))
    w = w.float()
    m, r = _errors(model_pred, ref_pred, target)
    inside = _dpo_inside(m, r, beta) * w
    loss = F.softplus(-inside).mean()
    return loss, {"implicit_acc": (inside > 0).float().mean(), "step_weight_mean": w.mean()}


def spec_sspo(model_pred, ref_pred, target, *, beta=5000.0, criterion="indicator"):
    """SSPO / SePPO (docs/methods.md §2.5), float32."""
    m, r = _errors(model_pred, ref_pred, target)
    m_w, m_s = m.chunk(2)
    r_w, r_s = r.chunk(2)
    a = (r_w - m_w).detach()
    c = (a > 0).float() if criterion == "indicator" else torch.sign(a)
    inside = -0.5 * beta * ((m_w - r_w) - c * (m_s - r_s))
    loss = F.softplus(-inside).mean()
    return loss, {"dpo_fraction": (c > 0).float().mean(), "implicit_acc": (inside > 0).float().mean()}


def _rpo_pairs(model_pred, ref_pred, target):
    m, r = _errors(model_pred, ref_pred, target)
    rho = -(m - r)
    rho_w, rho_l = rho.chunk(2)
    return rho_w[:, None] - rho_l[None, :]


def spec_rpo(model_pred, ref_pred, target, *, emb_w=None, emb_l=None, beta=5000.0, tau=0.5):
    """Diffusion-RPO (docs/methods.md §2.4), float32."""
    ell = _rpo_pairs(model_pred, ref_pred, target)
    if emb_w is None:
        W = torch.ones_like(ell)
    else:
        emb_l = emb_w if emb_l is None else emb_l
        ew = F.normalize(emb_w.float(), dim=-1, eps=1e-12)
        el = F.normalize(emb_l.float(), dim=-1, eps=1e-12)
        W = torch.softmax((ew @ el.T) / tau, dim=-1)
    loss = F.softplus(-0.5 * beta * W * ell).mean()
    return loss, {"implicit_acc": (ell.diagonal() > 0).float().mean(), "weights": W}


def spec_rpo_diagonal(model_pred, ref_pred, target, *, beta=5000.0, diagonal_weight=0.8):
    """Diffusion-RPO diagonal variant (docs/methods.md §2.4), float32."""
    ell = _rpo_pairs(model_pred, ref_pred, target)
    B = ell.shape[0]
    L = F.softplus(-0.5 * beta * ell)
    eye = torch.eye(B, device=L.device, dtype=torch.bool)
    diag = L.diagonal()
    off = L.masked_fill(eye, 0.0).sum(dim=1) / (B - 1)
    loss = (diagonal_weight * diag + (1 - diagonal_weight) * off).mean()
    return loss, {"implicit_acc": (ell.diagonal() > 0).float().mean()}


def spec_kto(model_pred, ref_pred, target, labels, *, beta=1000.0, lambda_d=1.0, lambda_u=1.0):
    """Diffusion-KTO (docs/methods.md §2.7), unpaired rows, float32, baseline from the batch."""
    m, r = _errors(model_pred, ref_pred, target)
    g = r - m
    z = torch.clamp(g.detach().mean(), min=0)
    desirable = labels != 0
    s = torch.where(desirable, 1.0, -1.0)
    lam = torch.where(desirable, lambda_d, lambda_u)
    x = s * beta * (g - z)
    loss = (lam * (1 - torch.sigmoid(x))).mean()
    return loss, {"kl": z, "acc": (x > 0).float().mean(), "model_mse": m.mean()}


def spec_mapo(model_pred, target, *, beta=0.1, snr_value=0.5, num_train_timesteps=1000):
    """MaPO (docs/methods.md §2.8), float32; ``h(x) = x / expm1(x)``."""
    m = (model_pred.float() - target.float()).pow(2).mean(dim=_row_dims(model_pred))
    m_w, m_l = m.chunk(2)
    xw, xl = snr_value * m_w, snr_value * m_l
    f_w, f_l = xw / torch.expm1(xw), xl / torch.expm1(xl)
    u = num_train_timesteps * (f_w - f_l)
    or_loss = -beta * F.logsigmoid(u).mean()
    loss = m_w.mean() + or_loss
    return loss, {"win_score": f_w.mean(), "lose_score": f_l.mean(), "or_loss": or_loss}


def spec_dmpo(model_pred, ref_pred, target, *, beta=2000.0, alpha=0.01):
    """DMPO (docs/methods.md §2.10), float32."""
    m, r = _errors(model_pred, ref_pred, target)
    inside = _dpo_inside(m, r, beta)
    q = min(max(1 - alpha, 1e-6), 1 - 1e-6)
    log_p, log_1mp = -F.softplus(-inside), -F.softplus(inside)
    p = log_p.exp()
    loss = (p * (log_p - math.log(q)) + (1 - p) * (log_1mp - math.log(1 - q))).mean()
    return loss, {"implicit_acc": (inside > 0).float().mean()}


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale, None


def spec_sdpo(model_pred, ref_pred, target, *, beta=5000.0, mu=0.9, eps=1e-9, max_scale=1.0):
    """Diffusion-SDPO with the DPO base (docs/methods.md §2.9), float32, λ computed on the device."""
    with torch.no_grad():
        e = model_pred.detach().float() - target.float()
        e_w, e_l = e.chunk(2)
        K = e_w.numel()
        num = 4 * e_w.pow(2).sum() / K**2
        den = 4 * (e_w * e_l).sum() / K**2
        lam = torch.where(
            den > 0, torch.clamp((1 - mu) * num / (den + eps), 0, max_scale), torch.full_like(den, max_scale)
        )
    m, r = _errors(model_pred, ref_pred, target)
    m_w, m_l = m.chunk(2)
    m_l = _ScaleGrad.apply(m_l, lam)
    r_w, r_l = r.chunk(2)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    loss = F.softplus(-inside).mean()
    return loss, {"implicit_acc": (inside > 0).float().mean(), "loser_grad_scale": lam}
