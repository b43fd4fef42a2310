"""A worked example of the loss API: `python -m fastpref.example`.

Builds a paired batch of SD1.5-like latents (winners first), runs each fused loss forward and
backward, and checks it against the eager PyTorch block an upstream trainer would write.
Runs on a GPU when there is one, else on the CPU under Triton's interpreter."""

import time

import torch
import torch.nn.functional as F

import fastpref


def eager_dpo(model_pred, ref_pred, target, beta):
    """The Diffusion-DPO loss block as trainers write it (fp32 upcasts, mean over C, H, W)."""
    up = torch.float64 if model_pred.dtype == torch.float64 else torch.float32
    model_losses = (model_pred.to(up) - target.to(up)).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (ref_pred.to(up) - target.to(up)).pow(2).mean(dim=[1, 2, 3])
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean()


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pairs, shape = 4, (4, 32, 32)  # SD1.5 latents of 256 px images
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2 * pairs, *shape, generator=g)  # the noise ε
    ref_pred = target + 0.5 * torch.randn(target.shape, generator=g)
    model_pred = ref_pred + 0.01 * torch.randn(target.shape, generator=g)
    target, ref_pred, model_pred = (x.to(device) for x in (target, ref_pred, model_pred))
    print(
        f"device: {device} ({'compiled Triton' if device.type == 'cuda' else 'Triton interpreter'}), "
        f"batch {tuple(model_pred.shape)}: {pairs} winners then {pairs} losers\n"
    )

    calls = [
        ("diffusion_dpo_loss", lambda p: fastpref.diffusion_dpo_loss(p, ref_pred, target, beta=5000.0)),
        (
            "diffusion_dpo_loss hinge",
            lambda p: fastpref.diffusion_dpo_loss(p, ref_pred, target, beta=5000.0, loss_type="hinge"),
        ),
        ("dspo_loss sd15", lambda p: fastpref.dspo_loss(p, ref_pred, target, beta=0.001)),
        ("dspo_loss sdxl", lambda p: fastpref.dspo_loss(p, ref_pred, target, beta=5000.0, variant="sdxl")),
        ("sft_loss", lambda p: fastpref.sft_loss(p, target)),
    ]
    for name, fn in calls:
        p = model_pred.clone().requires_grad_(True)
        start = time.perf_counter()
        loss, metrics = fn(p)
        loss.backward()
        elapsed = time.perf_counter() - start
        shown = {k: round(float(v), 4) for k, v in metrics.items() if v.dim() == 0 and k != "loss"}
        print(
            f"{name:26s} loss {float(loss.detach()):.6f}  |grad| {float(p.grad.norm()):.3e}  ({elapsed * 1e3:.0f} ms)"
        )
        print(f"{'':26s} {shown}")

    # Both fp32 computations against the exact (float64) value of the same loss.
    grads = {}
    for label, fn, dtype in [
        ("fused", fastpref.diffusion_dpo_loss, torch.float32),
        ("eager", lambda *a, **k: (eager_dpo(*a, **k),), torch.float32),
        ("float64", lambda *a, **k: (eager_dpo(*a, **k),), torch.float64),
    ]:
        p = model_pred.to(dtype).clone().requires_grad_(True)
        loss = fn(p, ref_pred.to(dtype), target.to(dtype), beta=5000.0)[0]
        loss.backward()
        grads[label] = (float(loss.detach()), p.grad.double())
    exact_loss, exact_grad = grads.pop("float64")
    print(f"\nDiffusion-DPO at beta 5000 against float64 (loss {exact_loss:.8f}):")
    for label, (loss, grad) in grads.items():
        rel = float((grad - exact_grad).norm() / exact_grad.norm())
        print(f"  {label:5s} fp32: loss error {abs(loss - exact_loss):.1e}, gradient relative error {rel:.1e}")


if __name__ == "__main__":
    main()
