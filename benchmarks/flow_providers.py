"""Providers of the flow-family whole-step sweep (``bench_family_step.py --sweep``): a
flow_grpo-style step against fastpref's step with each trainer speed option that applies to a
transformer denoiser, alone and all together (SD3-medium and Flux).

Every provider runs the same LoRA step on the same model (``bench_family_step.build``) and
the same pre-noised batch (``bench_family_step.inputs``/``noised``); β = 100 (flow_grpo's
``config/dpo.py`` ``train.beta``, the official convention, which is also fastpref's β).

- ``flow_grpo``: the issue's baseline, "four sequential forwards": the policy on the winners,
  the policy on the losers, the reference (adapters disabled, ``no_grad``) on the winners and
  on the losers, ``B`` rows each; then flow_grpo's eager loss block
  (``reference_blocks.flow_grpo_dpo``: float32 upcasts, whole-row means, winners first,
  ``-logsigmoid(-0.5 β (w_diff - l_diff))`` averaged over the pairs), backward, clip 1.0,
  ``torch.optim.AdamW`` (flow_grpo's ``config/base.py``: betas (0.9, 0.999), weight decay 1e-4,
  eps 1e-8), ``zero_grad()``.
- ``flow_grpo-batched``: the same loss and optimizer with the two forwards over ``2B`` rows
  that yifan123/flow_grpo ``scripts/train_sd3_dpo.py`` at ac4c86e8cae0 actually runs (its
  lines 905-923: winners and losers concatenated, one policy forward, one reference forward).
  Upstream's reference is a second, frozen LoRA adapter (``set_adapter("ref")``), equal to the
  base model at its zero init; here it is the base model with the adapters disabled, as in
  every other provider, so the reference's extra rank-8 matmuls are not timed.
- ``fastpref``: fastpref's step through the trainer's builders (``parse_config``,
  ``prepare_denoiser``, ``fastpref.training.run.optimizer_and_schedule``, ``make_step``): the policy
  forward over ``2B`` rows, the reference forward with the adapters disabled under
  ``no_grad``, the fused ``fastpref.diffusion_dpo_loss``.
- ``+<option>``: ``fastpref`` with one speed option (``speed_providers.OPTIONS``):
  ``+fused_adam``, ``+tf32``, ``+sdpa_flash``, ``+compile`` (regional compilation of the
  transformer blocks); ``full-stack``: all four. ``--channels_last`` (UNets only) and
  ``--cache_latents`` (every provider here already starts from latents and embeddings) do not
  apply; ``--cuda_graph`` and ``--fp8`` are the SD1.5 sweep's.
"""

from __future__ import annotations

import functools

import torch

FLOW_OPTIONS = ("+fused_adam", "+tf32", "+sdpa_flash", "+compile")
FLOW_SWEEP = ("flow_grpo", "flow_grpo-batched", "fastpref", *FLOW_OPTIONS, "full-stack")
BASELINE = "flow_grpo"
BETA = 100.0  # flow_grpo config/dpo.py: train.beta
LR = 1e-8  # tiny, so that the timed steps stay on the same loss surface


def flow_flags(provider: str) -> dict:
    """The trainer flags of ``provider`` (``flow_grpo*`` and ``fastpref``: none)."""
    import speed_providers as sp

    if provider not in FLOW_SWEEP:
        raise ValueError(f"--providers: expected names from {', '.join(FLOW_SWEEP)}, got {provider!r}")
    names = FLOW_OPTIONS if provider == "full-stack" else (provider,)
    flags = {}
    for name in names:
        flags.update(sp.OPTIONS.get(name, {}))
    return flags


def halves(noisy: torch.Tensor, batch: dict) -> list[tuple[torch.Tensor, dict]]:
    """``(noisy rows, batch rows)`` of the winners, then of the losers (``[2B, ...]`` -> ``[B, ...]``)."""
    rows = noisy.shape[0]
    return [(noisy[s], {k: v[s] for k, v in batch.items()}) for s in (slice(0, rows // 2), slice(rows // 2, rows))]


def flow_grpo_step(model, params, forward, noisy, target, batch, *, sequential: bool):
    """The flow_grpo-style step (``flow_grpo`` when ``sequential``, else ``flow_grpo-batched``):
    returns ``step() -> loss`` (0-d float32 tensor)."""
    import reference_blocks as rb

    from fastpref.training.models import adapters_disabled

    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    parts = halves(noisy, batch)

    def predict():
        if not sequential:
            return forward(noisy, batch)
        return torch.cat([forward(x, b) for x, b in parts])

    def step():
        model_pred = predict()
        with torch.no_grad(), adapters_disabled(model):
            ref_pred = predict()
        loss, _ = rb.flow_grpo_dpo(model_pred, ref_pred, target, beta=BETA)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return step


def fastpref_step(model, params, forward, noisy, target, batch, provider: str, compile_backend: str):
    """fastpref's step with ``provider``'s options, built as ``fastpref-train`` builds it;
    returns ``step() -> loss``. The caller has checked ``refusal``; ``model`` is this provider's own."""
    import fastpref
    from fastpref.training.config import parse_config
    from fastpref.training.models import adapters_disabled
    from fastpref.training.run import make_step, optimizer_and_schedule
    from fastpref.training.speed import prepare_denoiser, set_backends

    config = parse_config(learning_rate=LR, compile_backend=compile_backend, **flow_flags(provider))
    set_backends(config)
    prepare_denoiser(config, model)
    opt, _ = optimizer_and_schedule(config, params)

    def loss_fn(_):
        model_pred = forward(noisy, batch)
        with adapters_disabled(model), torch.no_grad():
            ref_pred = forward(noisy, batch)
        return fastpref.diffusion_dpo_loss(model_pred, ref_pred, target, beta=BETA)

    _, step = make_step(config, loss_fn, params, opt)
    run = functools.partial(step, [None])
    return lambda: run()["loss"]


def make_step(provider: str, model, params, forward, noisy, target, batch, compile_backend: str):
    """``step() -> loss`` of ``provider`` on ``model`` (fresh, with its LoRA ``params``).

    ``forward(noisy, batch) -> prediction`` runs ``model`` on ``noisy`` ``[R, C, h, w]`` with the
    rows ``batch`` (a dict of ``[R, ...]`` tensors) as the family does, float32 out; ``noisy`` and
    ``target`` are ``[2B, C, h, w]`` (winners then losers)."""
    if provider in ("flow_grpo", "flow_grpo-batched"):
        return flow_grpo_step(model, params, forward, noisy, target, batch, sequential=provider == "flow_grpo")
    return fastpref_step(model, params, forward, noisy, target, batch, provider, compile_backend)


def refusal(provider: str, compile_backend: str) -> str | None:
    """Why the trainer would refuse ``provider``'s flags here, or None."""
    import speed_providers as sp

    return sp.flags_refusal(flow_flags(provider), compile_backend)
