"""Flow matching core (fastpref/training/flow.py, docs/methods.md §7): noising, target, the σ
draw of every --weighting_scheme with the scheduler's shift, the error weighting, the Euler
sampler, each against a float64 implementation written here; the flow flags' refusals."""

import math

import diffusers  # noqa: F401  (the train extra: `make test` installs it; missing, these tests fail)
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers import needs_kernels
from train_helpers import FAST

import fastpref
from fastpref import train
from fastpref.training.args import FLOW_MATCHING_DEFAULTS
from fastpref.training.config import parse_config
from fastpref.training.families.stable_diffusion import StableDiffusionFamily
from fastpref.training.flow import FlowMatchingFamily
from fastpref.training.step import preference_loss

T = 1000


class _Flow(FlowMatchingFamily):
    """The flow core alone: a scheduler, no model."""

    class_names = ("_TestFlowPipeline",)

    def __init__(self, shift: float = 3.0, **flags):
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
        self.configure(parse_config(**flags))

    check = default_resolution = load = set_attention = add_lora = save_weights = None
    latent_shape = encode_prompts = encode_images = decode_latents = denoise = None


_Flow.__abstractmethods__ = frozenset()


def _shifted(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


def _reference_timestep(seed, scheme, mean, std, scale, shift):
    """float64 σ·T of diffusers' SD3 recipe from the same random draw (seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "logit_normal":
        z = torch.randn(1, generator=g, dtype=torch.float64).item()
        u = 1 / (1 + math.exp(-(mean + std * z)))
    else:
        r = torch.rand(1, generator=g).double().item()
        u = 1 - r - scale * (math.cos(math.pi * r / 2) ** 2 - 1 + r) if scheme == "mode" else r
    index = min(max(math.floor(u * T), 0), T - 1)
    sigma = (T - index) / T  # the scheduler's timesteps run T, T-1, ..., 1
    return _shifted(sigma, shift) * T, u * T


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_draw_timestep_every_scheme_with_shift(scheme, shift):
    mean, std, scale = 0.4, 0.8, 1.1  # not the defaults, so the flags are seen to arrive
    family = _Flow(shift, weighting_scheme=scheme, logit_mean=mean, logit_std=std, mode_scale=scale)
    draws = [family.draw_timestep(torch.Generator().manual_seed(seed)) for seed in range(600)]
    assert all(t.dtype == torch.float32 and t.shape == () for t in draws)
    mismatched = 0
    for seed, t in enumerate(draws):
        expected, u_t = _reference_timestep(seed, scheme, mean, std, scale, shift)
        if abs(t.item() - expected) > 1e-6 * T:
            # only a float32 / float64 rounding across an index boundary may differ
            assert abs(u_t - round(u_t)) < 1e-3, (seed, t.item(), expected)
            mismatched += 1
    assert mismatched <= 2
    values = torch.stack(draws).double() / T
    assert values.min() > 0 and values.max() <= 1
    if shift > 1:  # the shift moves σ up: mean above the unshifted draw's
        unshifted = _Flow(1.0, weighting_scheme=scheme, logit_mean=mean, logit_std=std, mode_scale=scale)
        base = torch.stack([unshifted.draw_timestep(torch.Generator().manual_seed(s)) for s in range(600)])
        assert values.mean() > base.double().mean() / T + 0.05


def test_logit_normal_density_matches_its_cdf():
    """Kolmogorov-Smirnov against the float64 CDF of the logit-normal σ (shift 1)."""
    mean, std = -0.5, 1.3
    family = _Flow(1.0, weighting_scheme="logit_normal", logit_mean=mean, logit_std=std)
    g = torch.Generator().manual_seed(123)
    sigma = torch.stack([family.draw_timestep(g) for _ in range(3000)]).double().sort().values / T
    # σ = (T - floor(u T)) / T, so P(σ <= s) = P(u >= 1 - s) for s on the grid
    logit = torch.log((1 - sigma) / sigma)
    cdf = 1 - 0.5 * (1 + torch.erf((logit - mean) / (std * math.sqrt(2))))
    empirical = torch.arange(1, len(sigma) + 1, dtype=torch.float64) / len(sigma)
    assert (empirical - cdf).abs().max() < 1.63 / math.sqrt(len(sigma))  # KS at p = 0.01


def test_add_noise_and_target_against_float64():
    family = _Flow(3.0)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.stack([family.draw_timestep(g) for _ in range(6)])
    noisy, target = family.add_noise(x0, eps, t)
    sigma = t.double().view(-1, 1, 1, 1) / T
    assert noisy.dtype == target.dtype == torch.float32
    torch.testing.assert_close(noisy.double(), (1 - sigma) * x0.double() + sigma * eps.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(target.double(), eps.double() - x0.double(), rtol=0, atol=1e-6)
    # the ends of the path: σ = 1 is pure noise, σ -> 0 the data
    ends, _ = family.add_noise(x0[:2], eps[:2], torch.tensor([float(T), 1e-9]))
    torch.testing.assert_close(ends[0], eps[0])
    torch.testing.assert_close(ends[1], x0[1])


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal"])
def test_error_weight_against_float64(scheme):
    family = _Flow(3.0, weighting_scheme=scheme)
    t = torch.rand(16, generator=torch.Generator().manual_seed(3)) * (T - 1) + 1
    weight = family.error_weight(t)
    sigma = t.double() / T
    if scheme == "logit_normal":
        assert weight is None
        return
    expected = sigma**-2 if scheme == "sigma_sqrt" else 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=0)


def test_error_weight_scales_each_rows_squared_error_in_the_loss():
    """preference_loss hands the loss sqrt(w)-scaled prediction, reference and target."""
    family = _Flow(3.0, weighting_scheme="cosmap")
    g = torch.Generator().manual_seed(11)
    seen = {}

    def loss_type(model_pred, ref_pred, target, batch, **_):
        seen.update(model=model_pred, ref=ref_pred, target=target)
        return model_pred.sum(), {}

    loss_type.needs_reference, loss_type.extra_input = True, None
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([900.0, 40.0, 900.0, 40.0])
    pred, ref = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    batch = type("B", (), dict(latents=latents, noise=noise, timesteps=timesteps, embeddings=None, pooled=None))
    preference_loss(lambda *a: pred, lambda *a: ref, family, loss_type, batch)
    sigma = timesteps.double().view(-1, 1, 1, 1) / T
    w = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    target = noise.double() - latents.double()
    for name, value in (("model", pred), ("ref", ref), ("target", target)):
        torch.testing.assert_close(seen[name].double(), w.sqrt() * value.double(), rtol=1e-6, atol=1e-6)


def _reference_sigmas(num_steps, shift):
    """float64 Euler schedule of FlowMatchEulerDiscreteScheduler.set_timesteps (static shift)."""
    sigma_min = _shifted(1 / T, shift)
    grid = [1 + (sigma_min - 1) * k / (num_steps - 1) for k in range(num_steps)]
    return [_shifted(s, shift) for s in grid] + [0.0]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_sampler_with_guidance_against_float64(shift):
    family = _Flow(shift)
    g = torch.Generator().manual_seed(5)
    B, steps, scale = 3, 6, 2.5
    start = torch.randn(B, 4, 8, 8, generator=g)
    emb, neg = torch.randn(B, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    pooled, neg_pooled = torch.randn(B, 8, generator=g), torch.randn(1, 8, generator=g)
    calls = []

    def field(x, t, e, p, xp=torch):
        """A velocity that depends on x, t and both conditionings."""
        a = e.mean(dim=(1, 2)).view(-1, 1, 1, 1) + p.mean(dim=1).view(-1, 1, 1, 1)
        return -0.7 * x + (t / T) * a + 0.1 * xp.sin(x)

    def predict(x, t, e, p):
        calls.append(t)
        assert x.shape[0] == 2 * B and t.shape == () and t.dtype == torch.float32
        return field(x, t, e, p)

    out = family.sample(predict, emb, pooled, neg, neg_pooled, start, num_steps=steps, guidance_scale=scale)
    assert out.shape == start.shape and out.dtype == torch.float32 and len(calls) == steps

    sigmas = _reference_sigmas(steps, shift)
    torch.testing.assert_close(torch.stack(calls).double() / T, torch.tensor(sigmas[:-1], dtype=torch.float64))
    x = start.double()
    e = torch.cat([neg.expand_as(emb), emb]).double()
    p = torch.cat([neg_pooled.expand_as(pooled), pooled]).double()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        u, c = field(torch.cat([x, x]), torch.tensor(s * T, dtype=torch.float64), e, p).chunk(2)
        x = x + (s_next - s) * (u + scale * (c - u))
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)

    # the pipeline's own loop (diffusers' scheduler.step) gives the same latents
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(steps)
    y = start.clone()
    for t in scheduler.timesteps:
        u, c = field(
            torch.cat([y, y]),
            t,
            torch.cat([neg.expand_as(emb), emb]),
            torch.cat([neg_pooled.expand_as(pooled), pooled]),
        ).chunk(2)
        y = scheduler.step(u + scale * (c - u), t, y).prev_sample
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)


def test_configure_defaults_are_diffusers():
    family = _Flow(3.0)
    assert {k: getattr(family, k) for k in FLOW_MATCHING_DEFAULTS} == {
        "weighting_scheme": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
    }


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--weighting_scheme", "mode"), ("--logit_mean", "0.5"), ("--logit_std", "2"), ("--mode_scale", "1.0")],
)
def test_flow_flag_refused_for_a_ddpm_family(tmp_path, flag, value):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"^{flag}: a flow matching flag.*StableDiffusionPipeline.*got"):
        train.main([*FAST, "--output_dir", str(out), "--max_train_steps", "1", flag, value])
    assert not out.exists()
    with pytest.raises(ValueError, match=flag):
        StableDiffusionFamily.check_flags(parse_config([flag, value]))
    FlowMatchingFamily.check_flags(parse_config([flag, value]))  # a flow family takes it


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--logit_std", "0"], "--logit_std: expected a finite number > 0"),
        (["--logit_mean", "nan"], "--logit_mean: expected a finite number"),
        (["--mode_scale", "inf"], "--mode_scale: expected a finite number"),
    ],
)
def test_flow_flag_values_checked(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_unknown_weighting_scheme_refused():
    with pytest.raises(ValueError, match="--weighting_scheme: expected one of"):
        parse_config(weighting_scheme="karras")


@needs_kernels
def test_dense_dpo_step_discount_on_flow_timesteps(device):
    """docs/methods.md §7: the §2.6 discount of t = σT, k = clamp(floor(K (1 - σ) - K/T), 0, K-1)."""
    family = _Flow(3.0)
    g = torch.Generator().manual_seed(17)
    B, K, gamma = 8, 50, 0.9
    t = torch.stack([family.draw_timestep(g) for _ in range(B - 2)] + [torch.tensor(float(T)), torch.tensor(1.0)])
    pred, ref_pred, target = (torch.randn(2 * B, 4, 8, 8, generator=g, device="cpu").to(device) for _ in range(3))
    _, metrics = fastpref.dense_dpo_loss(pred, ref_pred, target, t.to(device), gamma=gamma, normalize=False)
    sigma = t.double() / T
    k = torch.clamp(torch.floor(K * (1 - sigma) - K / T), 0, K - 1)
    assert k[-2] == 0 and k[-1] == K - 1  # σ = 1 the first step, σ = 1/T the last
    torch.testing.assert_close(metrics["step_weight_mean"].double().cpu(), (gamma**k).mean(), rtol=1e-6, atol=0)
