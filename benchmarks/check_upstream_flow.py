"""Check `fastpref.compat`'s flow-matching drop-ins against the upstream code itself.

Reads the loss code from local clones of yifan123/flow_grpo and bghira/SimpleTuner (nothing of
theirs is copied into this repository: the lines are read and executed from the clone at run
time), runs it on the same tensors as the drop-in, and prints relative errors against float64
(upstream's own lines with `.float()` read as `.double()`):

    python benchmarks/check_upstream_flow.py --flow-grpo PATH/flow_grpo --simpletuner PATH/SimpleTuner

flow_grpo: the loss lines of `scripts/train_sd3_dpo.py` (from `theta_mse = ` to the
`implicit_acc` append), executed with the script's variable names. SimpleTuner:
`FlowDPODistiller.compute_distill_loss` of `simpletuner/helpers/distillation/flow_dpo/distiller.py`,
the class loaded from that file with stand-ins for its three SimpleTuner imports, the model
forwards replaced by the given predictions (`model_predict` returns them), so that everything
from the targets to the logs is upstream's. Inputs: SD3 latents at 512 px, [B, 16, 64, 64];
relative error = max |a - b| / max |b| (per tensor). CPU; the kernels run under Triton's
interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import types
from collections import defaultdict

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F

from fastpref import compat

FLOW_GRPO_FILE = "scripts/train_sd3_dpo.py"
SIMPLETUNER_FILE = "simpletuner/helpers/distillation/flow_dpo/distiller.py"
SHAPE = (16, 64, 64)  # SD3 / SD3.5 latents at 512 px


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def inputs(B, seed, offset, dtype):
    """Latents x_w, x_l and the pair's noise in the latents' dtype, targets noise - x in that
    dtype (as both trainers form them); reference = target + a row error of std in [0.2, 0.5]
    (half its variance shared by the pair), policy = reference + offset N(0, 1), both in the
    predictions' dtype."""
    pred_dtype, lat_dtype = dtype
    g = torch.Generator().manual_seed(seed)
    n = lambda: torch.randn((B, *SHAPE), generator=g, dtype=torch.float64)  # noqa: E731
    x_w, x_l, noise = (v.to(lat_dtype) for v in (n(), n(), n()))
    t_w, t_l = noise - x_w, noise - x_l
    sig = 0.2 + 0.3 * torch.rand(2, B, 1, 1, 1, generator=g, dtype=torch.float64)
    shared = n()
    r_w = t_w.double() + sig[0] * (0.5**0.5 * shared + 0.5**0.5 * n())
    r_l = t_l.double() + sig[1] * (0.5**0.5 * shared + 0.5**0.5 * n())
    p_w, p_l = r_w + offset * n(), r_l + offset * n()
    preds = {k: v.to(pred_dtype) for k, v in dict(r_w=r_w, r_l=r_l, p_w=p_w, p_l=p_l).items()}
    return dict(x_w=x_w, x_l=x_l, noise=noise, t_w=t_w, t_l=t_l, **preds)


# --- flow_grpo -----------------------------------------------------------------------------


def flow_grpo_block(root, double=False):
    lines = open(os.path.join(root, FLOW_GRPO_FILE)).read().splitlines()
    start = next(i for i, s in enumerate(lines) if s.strip().startswith("theta_mse = "))
    end = next(i for i, s in enumerate(lines) if 'info["implicit_acc"].append' in s)
    src = textwrap.dedent("\n".join(lines[start : end + 1]))
    if double:
        src = src.replace(".float()", ".double()")
    return compile(src, f"{FLOW_GRPO_FILE}:{start + 1}-{end + 1}", "exec")


def run_flow_grpo(code, model_pred, model_pred_ref, target, beta):
    leaf = model_pred.detach().clone().requires_grad_(True)
    ns = dict(
        torch=torch,
        F=F,
        model_pred=leaf,
        model_pred_ref=model_pred_ref,
        target=target,
        bsz=model_pred.shape[0] // 2,
        config=types.SimpleNamespace(train=types.SimpleNamespace(beta=beta)),
        info=defaultdict(list),
    )
    exec(code, ns)
    ns["loss"].backward()
    return ns["loss"].detach(), {k: v[0].detach() for k, v in ns["info"].items()}, leaf.grad


def check_flow_grpo(root, seeds, dtypes):
    code32, code64 = flow_grpo_block(root), flow_grpo_block(root, double=True)
    rows = []
    for beta in (100.0, 2000.0):
        for dtype in dtypes:
            worst = defaultdict(float)
            for seed in range(seeds):
                for offset in (0.05, 0.2, 0.5):
                    x = inputs(2, seed, offset, dtype)
                    p, r, t = (torch.cat([x[a], x[b]]) for a, b in (("p_w", "p_l"), ("r_w", "r_l"), ("t_w", "t_l")))
                    up = run_flow_grpo(code32, p, r, t, beta)
                    ref = run_flow_grpo(code64, p.double(), r.double(), t.double(), beta)
                    leaf = p.detach().clone().requires_grad_(True)
                    loss, logs = compat.flow_grpo_dpo_loss(leaf, r, t, beta=beta)
                    loss.backward()
                    ours = (loss, logs, leaf.grad)
                    for name, res in (("upstream", up), ("fastpref", ours)):
                        worst[name, "loss"] = max(worst[name, "loss"], rel(res[0], ref[0]))
                        worst[name, "grad"] = max(worst[name, "grad"], rel(res[2], ref[2]))
                        assert set(res[1]) == set(ref[1]), sorted(res[1])
                        for k in ref[1]:
                            worst["key", name, k] = max(worst["key", name, k], rel(res[1][k], ref[1][k]))
                    worst["vs", "loss"] = max(worst["vs", "loss"], rel(ours[0], up[0]))
            rows.append((f"flow_grpo β {beta:g}", _dt(dtype), worst))
    return rows


# --- SimpleTuner ---------------------------------------------------------------------------


def simpletuner_class(root, double=False):
    """FlowDPODistiller from the clone, its SimpleTuner imports stood in for."""

    class DistillationBase:
        def __init__(self, teacher_model, student_model=None, config=None):
            self.teacher_model, self.student_model = teacher_model, student_model or teacher_model
            self.config = dict(config or {})

        def toggle_adapter(self, enable=False):
            pass

    stubs = {
        "simpletuner.helpers.data_backend.dataset_types": dict(
            DatasetType=types.SimpleNamespace(IMAGE="image", VIDEO="video", CONDITIONING="conditioning")
        ),
        "simpletuner.helpers.distillation.common": dict(DistillationBase=DistillationBase),
        "simpletuner.helpers.distillation.registry": dict(
            DistillationRegistry=types.SimpleNamespace(register=lambda *a, **k: None)
        ),
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)
    try:
        src = open(os.path.join(root, SIMPLETUNER_FILE)).read()
        if double:
            src = src.replace(".float()", ".double()").replace("torch.float32", "torch.float64")
        ns = {"__name__": "upstream_flow_dpo"}
        exec(compile(src, SIMPLETUNER_FILE, "exec"), ns)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return ns["FlowDPODistiller"]


class _Model:
    """model_predict returns the prediction given for the batch's latents."""

    def __init__(self, by_latents):
        self.by_latents = by_latents

    def model_predict(self, batch):
        return {"model_prediction": self.by_latents[id(batch["latents"])]}


def run_simpletuner(cls, config, state, x, mask_image, double, mask=None):
    d = torch.float64 if double else None
    cv = (lambda t: t.double()) if double else (lambda t: t)
    p_w = cv(x["p_w"]).detach().clone().requires_grad_(True)
    p_l = cv(x["p_l"]).detach().clone().requires_grad_(True)
    x_w, x_l, noise = cv(x["x_w"]), cv(x["x_l"]), cv(x["noise"])
    dist = object.__new__(cls)
    dist.config = {**cls._DEFAULTS, **config}
    dist.margin_ema = state.get("ema")
    dist.student_model = _Model({id(x_l): p_l})
    dist.teacher_model = _Model({id(x_w): cv(x["r_w"]), id(x_l): cv(x["r_l"])})
    sig = torch.full((x_w.shape[0], 1, 1, 1), 0.6, dtype=d or x_w.dtype)
    batch = dict(
        latents=x_w,
        conditioning_latents=x_l,
        conditioning_type="reference_strict",
        noise=noise,
        input_noise=noise,
        sigmas=sig,
        timesteps=sig.flatten() * 1000,
        noisy_latents=(1 - sig) * x_w + sig * noise,
    )
    if mask_image is not None:
        batch.update(loss_mask_type="mask", conditioning_pixel_values=cv(mask_image))
    if double:  # float64 copies of the same rounded targets (noise - latents in the latents' dtype) and mask
        targets = {id(x_w): x["t_w"].double(), id(x_l): x["t_l"].double()}
        dist._flow_target = lambda batch, latents: targets[id(latents)]
        if mask is not None:
            dist._mask_for_loss = lambda batch, prediction: mask
    original = _original_loss(p_w, noise - x_w, torch.float64 if double else torch.float32)
    loss, logs = dist.compute_distill_loss(batch, {"model_prediction": p_w}, original)
    loss.backward()
    state["ema"] = dist.margin_ema
    mask = dist._mask_for_loss(batch, p_w)
    return loss.detach(), {k: torch.tensor(v, dtype=torch.float64) for k, v in logs.items()}, p_w.grad, p_l.grad, mask


def _original_loss(pred, target, dtype):
    """A stand-in for the trainer's own loss (its plain flow-matching MSE on the preferred side)."""
    return F.mse_loss(pred.to(dtype), target.to(dtype))


SIMPLETUNER_CASES = [
    ("sum, β 1", dict(auto_beta=False, beta=1.0), False, (0.002, 0.005, 0.01)),
    ("sum, auto β (defaults)", dict(), False, (0.02, 0.05, 0.1)),
    ("mean, β 2000", dict(norm_type="mean", auto_beta=False, beta=2000.0), False, (0.005, 0.02, 0.05)),
    ("masked_mean + mask, β 2000", dict(norm_type="masked_mean", auto_beta=False, beta=2000.0), True, (0.005, 0.02)),
    ("sum + mask, auto β, anchor 0.5, SFT 0.1", dict(anchor_alpha=0.5, sft_loss_weight=0.1), True, (0.02, 0.05)),
]


def check_simpletuner(root, seeds, dtypes):
    cls32, cls64 = simpletuner_class(root), simpletuner_class(root, double=True)
    rows = []
    for label, config, masked, offsets in SIMPLETUNER_CASES:
        for dtype in dtypes:
            worst = defaultdict(float)
            for seed in range(seeds):
                states = ({}, {})
                ours_fn = compat.SimpleTunerFlowDPO(**config)
                for step, offset in enumerate(offsets):  # consecutive steps: the automatic β's running mean
                    x = inputs(2, 100 * seed + step, offset, dtype)
                    g = torch.Generator().manual_seed(7 + seed)
                    mask_image = (torch.rand(2, 1, 512, 512, generator=g) * 2 - 1) if masked else None
                    up = run_simpletuner(cls32, config, states[0], x, mask_image, False)
                    ref = run_simpletuner(
                        cls64, config, states[1], x, mask_image, True, None if up[4] is None else up[4].double()
                    )
                    p_w = x["p_w"].detach().clone().requires_grad_(True)
                    p_l = x["p_l"].detach().clone().requires_grad_(True)
                    original = _original_loss(p_w, x["t_w"], torch.float32)
                    loss, logs = ours_fn(
                        p_w,
                        p_l,
                        x["r_w"],
                        x["r_l"],
                        x["t_w"],
                        x["t_l"],
                        mask=up[4].detach() if masked else None,
                        original_loss=original,
                    )
                    loss.backward()
                    ours = (loss, logs, p_w.grad, p_l.grad)
                    assert set(logs) == set(ref[1]), sorted(set(logs) ^ set(ref[1]))
                    for name, res in (("upstream", up), ("fastpref", ours)):
                        worst[name, "loss"] = max(worst[name, "loss"], rel(res[0], ref[0]))
                        g_res, g_ref = torch.cat([res[2], res[3]]), torch.cat([ref[2], ref[3]])
                        worst[name, "grad"] = max(worst[name, "grad"], rel(g_res, g_ref))
                    for name, res_logs in (("upstream", up[1]), ("fastpref", logs)):
                        for k in ref[1]:
                            if k != "flow_dpo_negative_margin_pct":
                                worst["key", name, k] = max(worst["key", name, k], rel(res_logs[k], ref[1][k]))
                    worst["vs", "loss"] = max(worst["vs", "loss"], rel(ours[0], up[0]))
                    b = float(ref[1]["flow_dpo_beta"])
                    worst["beta_max"] = max(worst["beta_max"], b)
                    worst["beta_min"] = min(worst.get("beta_min", b), b)
            label_beta = f"{label} (β {worst['beta_min']:.3g}-{worst['beta_max']:.3g})" if "auto" in label else label
            rows.append((f"SimpleTuner {label_beta}", _dt(dtype), worst))
    return rows


def _dt(dtype):
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    return f"{names[dtype[0]]} predictions, {names[dtype[1]]} latents"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow-grpo", required=True, help="a clone of yifan123/flow_grpo")
    ap.add_argument("--simpletuner", required=True, help="a clone of bghira/SimpleTuner")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]
    rows = check_flow_grpo(args.flow_grpo, args.seeds, dtypes) + check_simpletuner(args.simpletuner, args.seeds, dtypes)
    print(
        "| block | inputs | vs float64, loss: upstream / fastpref | vs float64, gradient: upstream / fastpref "
        "| upstream vs fastpref, loss | log keys vs float64: upstream | fastpref |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, dt, w in rows:
        print(
            f"| {label} | {dt} | {w['upstream', 'loss']:.1e} / {w['fastpref', 'loss']:.1e} | "
            f"{w['upstream', 'grad']:.1e} / {w['fastpref', 'grad']:.1e} | {w['vs', 'loss']:.1e} | "
            f"{_keys(w, 'upstream')} | {_keys(w, 'fastpref')} |"
        )
    key_table(rows)


def key_table(rows):
    """Each log key's worst relative error against float64 over every row, upstream / fastpref."""
    keys = {}
    for _, _, w in rows:
        for k, v in w.items():
            if k[0] == "key":
                keys.setdefault(k[2], {}).setdefault(k[1], 0.0)
                keys[k[2]][k[1]] = max(keys[k[2]][k[1]], v)
    print("\n| log key | vs float64, worst over the rows: upstream / fastpref |\n|---|---|")
    for k, v in keys.items():
        print(f"| `{k}` | {v['upstream']:.1e} / {v['fastpref']:.1e} |")


def _keys(worst, name):
    """The worst log key, and the worst of the others."""
    keys = sorted(((v, k[2]) for k, v in worst.items() if k[0] == "key" and k[1] == name), reverse=True)
    return f"{keys[0][1]} {keys[0][0]:.1e}; others ≤ {keys[1][0]:.1e}"


if __name__ == "__main__":
    main()
