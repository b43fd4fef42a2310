"""A float64 implementation of docs/methods.md, written plainly
from the formulas (no cancellation-free forms, no fused tricks); gradients come from
autograd. The kernels are tested against it."""

import torch
import torch.nn.functional as F


def row_mse(x, y):
    return ((x - y) ** 2).flatten(1).mean(1)


def pair_errors(model_pred, ref_pred, target):
    """(m_w, m_l, r_w, r_l), each [B]."""
    m = row_mse(model_pred, target)
    r = row_mse(ref_pred, target)
    B = m.shape[0] // 2
    return m[:B], m[B:], r[:B], r[B:]


def shared_metrics(m_w, m_l, r_w, r_l):
    return {
        "model_mse": 0.5 * (m_w.mean() + m_l.mean()),
        "ref_mse": torch.cat([r_w, r_l]).mean(),
        "model_mse_w": m_w.mean(),
        "model_mse_l": m_l.mean(),
        "ref_mse_w": r_w.mean(),
        "ref_mse_l": r_l.mean(),
    }


def dpo(model_pred, ref_pred, target, beta=5000.0, loss_type="sigmoid"):
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    ell = (r_w - r_l) - (m_w - m_l)
    inside = 0.5 * beta * ell
    if loss_type == "sigmoid":
        loss = F.softplus(-inside).mean()
    elif loss_type == "hinge":
        loss = torch.relu(1 - inside).mean()
    elif loss_type == "ipo":
        loss = ((ell - 1 / beta) ** 2).mean()
    else:
        raise ValueError(loss_type)
    wins = (inside > 0).double().mean()
    metrics = {
        "loss": loss,
        "implicit_acc": wins,
        "implicit_acc_ties_half": wins + 0.5 * (inside == 0).double().mean(),
        "inside_term": inside,
        **shared_metrics(m_w, m_l, r_w, r_l),
    }
    return loss, metrics


def sft(model_pred, target, winners_only=False):
    rows = model_pred[: model_pred.shape[0] // 2] if winners_only else model_pred
    loss = ((rows - target[: rows.shape[0]]) ** 2).mean()
    return loss, {"loss": loss}


def dspo(model_pred, ref_pred, target, beta=0.001, variant="sd15", sdxl_threshold=0.1):
    m_w, m_l, r_w, r_l = pair_errors(model_pred, ref_pred, target)
    B = m_w.shape[0]
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    g = torch.sigmoid(-inside)  # carries gradient
    shape = (B,) + (1,) * (model_pred.dim() - 1)
    e = model_pred[:B] - target[:B]
    d = model_pred[:B] - ref_pred[:B]
    if variant == "sd15":
        loss = ((e - beta * g.view(shape) * d) ** 2).flatten(1).mean(1).mean()
        branch = 0
    else:
        q = (d**2).mean().detach()
        if q >= sdxl_threshold:
            loss = ((g.view(shape) * d) ** 2).flatten(1).mean(1).mean()
            branch = 1
        else:
            loss = (g**2).mean()
            branch = 2
    shared = shared_metrics(m_w, m_l, r_w, r_l)
    metrics = {
        "loss": loss,
        "implicit_acc": (inside > 0).double().mean(),
        "model_mse": shared["model_mse"],
        "ref_mse": shared["ref_mse"],
        "weight_mean": g.mean(),
        "sdxl_branch": torch.tensor(branch),
    }
    return loss, metrics
