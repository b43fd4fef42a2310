"""The method registry (kernels/registry.py) reaches everything built from it: every descriptor
is a public `fastpref.<function>`, a `PreferenceLoss` method, a trainer `--loss_type`, a
benchmarked method and a float64 reference in the tests, its descriptor agrees with its public
signature and metric keys, and a method added as one head file is found and runs."""

import inspect
import sys
import textwrap

import pytest
import reference
import reference_extended
import torch
from helpers import make_inputs
from loss_calls import CALLS, call
from test_benchmarks_quick import _REGISTRY as BENCH

import fastpref
from fastpref.kernels import REGISTRY, registry
from fastpref.training.losses import LOSS_TYPES, get_loss_type

REFERENCES = (reference, reference_extended)


def problems(methods, api=fastpref, loss_types=LOSS_TYPES, bench=BENCH.METHODS, references=REFERENCES, calls=CALLS):
    """Everything a registered method should reach but does not, as sentences (empty: all reached)."""
    found = []
    for name, m in methods.items():
        fn = getattr(api, m.function, None)
        if not callable(fn) or m.function not in api.__all__:
            found.append(f"{name}: fastpref.{m.function} is not exported")
            continue
        if api.METHODS.get(name) is not fn:
            found.append(f"{name}: PreferenceLoss({name!r}) does not run fastpref.{m.function}")
        if not any(entry.function == m.function for entry in loss_types.values()):
            found.append(f"{name}: no --loss_type runs fastpref.{m.function}")
        if not any(entry.fastpref == m.function for entry in bench.values()):
            found.append(f"{name}: no benchmark runs fastpref.{m.function}")
        if not any(callable(getattr(module, name, None)) for module in references):
            found.append(f"{name}: no float64 reference `{name}` in tests/reference*.py")
        found += [f"{name}: preset {p!r} is not in tests/loss_calls.CALLS" for p, _ in m.presets if p not in calls]
        params = inspect.signature(fn).parameters
        expected = {h.name: h.default for h in m.hypers}
        expected.update({o.name: o.default for o in m.options if o.public})
        for key, default in expected.items():
            if key not in params or params[key].default != default:
                found.append(f"{name}: fastpref.{m.function} has no keyword {key}={default!r} (its descriptor's)")
    return found


def test_every_method_is_reachable_everywhere():
    assert len(REGISTRY) == 11
    assert problems(REGISTRY) == []


def test_the_walk_reports_a_method_that_is_not_exported(monkeypatch):
    """The check can fail: drop one export and it names the method."""
    monkeypatch.setattr(fastpref, "__all__", [n for n in fastpref.__all__ if n != "dmpo_loss"])
    assert problems(REGISTRY) == ["dmpo: fastpref.dmpo_loss is not exported"]


def test_the_walk_reports_every_table_a_method_is_missing_from():
    dmpo = REGISTRY["dmpo"]
    assert problems({"dmpo": dmpo}, loss_types={}, bench={}, references=(), calls={}) == [
        "dmpo: no --loss_type runs fastpref.dmpo_loss",
        "dmpo: no benchmark runs fastpref.dmpo_loss",
        "dmpo: no float64 reference `dmpo` in tests/reference*.py",
        "dmpo: preset 'dmpo' is not in tests/loss_calls.CALLS",
    ]


def test_old_spellings_still_work():
    """Names users typed before the registry: PreferenceLoss methods, --loss_type values and
    benchmark --methods names (dashes are accepted for underscores where names are typed)."""
    for name in (
        "dpo",
        "sft",
        "dspo",
        "rpo",
        "rpo_diagonal",
        "sspo",
        "dense_dpo",
        "kto",
        "mapo",
        "sdpo",
        "dmpo",
        "rpo-diagonal",
        "dense-dpo",
    ):
        assert fastpref.PreferenceLoss(name).method == name.replace("-", "_")
    for name in (
        "dpo",
        "dpo_hinge",
        "dpo_ipo",
        "sft",
        "dspo",
        "dspo_sdxl",
        "dense_dpo",
        "rpo",
        "rpo_uniform",
        "rpo_diagonal",
        "kto",
        "mapo",
        "sdpo",
        "dmpo",
        "sspo",
    ):
        assert get_loss_type(name).function in fastpref.__all__
    old_bench = [
        "dpo_sigmoid",
        "dpo_hinge",
        "dpo_ipo",
        "sft",
        "dspo_sd15",
        "dspo_sdxl",
        "rpo",
        "rpo_diagonal",
        "sspo",
        "dense_dpo",
        "kto",
        "mapo",
        "sdpo",
        "dmpo",
    ]
    assert list(BENCH.METHODS) == old_bench
    assert [m.name for m in BENCH.select_methods("dpo-hinge,rpo_uniform")] == ["dpo_hinge", "rpo_uniform"]
    with pytest.raises(ValueError, match="method must be one of"):
        fastpref.PreferenceLoss("dpo_sigmoid")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_metric_keys_are_the_descriptors(name, device):
    m = REGISTRY[name]
    p, r, t = make_inputs((4, 3, 4, 4), torch.float32, device, 1, 0.1)
    _, metrics = call(m.presets[0][0], p, r, t)
    assert set(metrics) <= set(m.layout.names) and "loss" in metrics
    assert set(m.layout.names) - set(metrics) <= {
        "safeguard_num",
        "safeguard_den",
        "safeguard_proxy_grad_cos",
        "dspo_branch",
    }


@pytest.mark.parametrize("name", ["dpo_hinge", "dmpo", "mapo", "sspo_sign", "rpo_diagonal"])
def test_a_descriptor_alone_gives_the_same_loss(name, device):
    """`losses.generic_loss` (what a head-file-only method gets) matches the explicit function."""
    fn, uses_ref, kw, _ = CALLS[name]
    method = next(m for m in REGISTRY.values() if m.function == fn.__name__)
    p, r, t = make_inputs((4, 3, 4, 4), torch.float64, device, 2, 0.1)
    args = (p, r, t) if uses_ref else (p, t)
    loss, metrics = fn(*args, **kw)
    loss2, metrics2 = fastpref.losses.generic_loss(method)(*args, **kw)
    assert torch.equal(loss, loss2) and all(torch.equal(metrics[k], metrics2[k]) for k in metrics)


NEW_HEAD = textwrap.dedent('''
    """A method added as one file: loss = scale * mean_i m_w,i (the winners' MSE), reference-free."""
    import triton
    import triton.language as tl

    from fastpref.kernels._math import f64
    from fastpref.kernels.heads.common import load_model_sums, masked_mean, store_pair_coefs, store_scalar
    from fastpref.kernels.method import Hyper, Layout, Method


    @triton.jit
    def winner_mse_head(part_ptr, B, splits, inv_n, scale, loss_ptr, stats_ptr, coef_ptr,
                        C: tl.constexpr, ACC: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr):
        inv_n = f64(inv_n, ACC)
        scale = f64(scale, ACC)
        valid = tl.arange(0, NP) < B
        m_w = load_model_sums(part_ptr, 0, B, 2 * B, splits, NP, SP, ACC) * inv_n
        m_l = load_model_sums(part_ptr, B, B, 2 * B, splits, NP, SP, ACC) * inv_n
        loss = scale * masked_mean(m_w, valid, B)
        a_w = tl.where(valid, 2.0 * inv_n * scale / B, 0.0)
        store_pair_coefs(coef_ptr, B, a_w, 0.0 * a_w, NP)
        tl.store(loss_ptr, loss)
        store_scalar(stats_ptr, C, "loss", loss)
        store_scalar(stats_ptr, C, "model_mse_l", masked_mean(m_l, valid, B))


    METHODS = (Method("winner_mse", "winner_mse_loss", winner_mse_head, Layout(("loss", "model_mse_l")),
                      hypers=(Hyper("scale", 1.0, "positive_finite"),), needs_ref=False,
                      presets=(("winner_mse", {}),), loss_types=(("winner_mse", "winner_mse", "test"),),
                      description="winners' MSE", section="9.1"),)
''')


def test_a_new_head_file_is_registered_and_runs(tmp_path, monkeypatch, device):
    """The README recipe: one new file in kernels/heads/ is a registered method with a public
    function (validated, 3 launches, gradient) and nothing else edited; the walk then names the
    tables that are built at import (this test adds the file after import) and its missing reference."""
    (tmp_path / "winner_mse.py").write_text(NEW_HEAD)
    from fastpref.kernels import heads

    monkeypatch.setattr(heads, "__path__", list(heads.__path__) + [str(tmp_path)])
    try:
        methods = registry._collect()
        assert list(methods)[-1] == "winner_mse" and len(methods) == 12
        method = methods["winner_mse"]
        loss_fn = fastpref.losses.generic_loss(method)
        assert str(inspect.signature(loss_fn)) == "(model_pred, target, *, scale=1.0)"
        p, _, t = make_inputs((4, 3, 4, 4), torch.float64, device, 3, 0.1)
        with pytest.raises(ValueError, match="scale must be finite and > 0, got -1.0"):
            loss_fn(p, t, scale=-1.0)
        x = p.detach().clone().requires_grad_(True)
        loss, metrics = loss_fn(x, t, scale=3.0)
        loss.backward()
        leaf = p.detach().clone().requires_grad_(True)
        expected = 3.0 * ((leaf[:2] - t[:2]) ** 2).mean()
        expected.backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(x.grad, leaf.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(metrics["model_mse_l"], ((p[2:] - t[2:]) ** 2).mean(), rtol=1e-12, atol=0)
        assert problems({"winner_mse": method}) == ["winner_mse: fastpref.winner_mse_loss is not exported"]
        assert problems({"winner_mse": method}, api=_Api(loss_fn)) == [
            "winner_mse: no --loss_type runs fastpref.winner_mse_loss",
            "winner_mse: no benchmark runs fastpref.winner_mse_loss",
            "winner_mse: no float64 reference `winner_mse` in tests/reference*.py",
            "winner_mse: preset 'winner_mse' is not in tests/loss_calls.CALLS",
        ]
    finally:
        sys.modules.pop(f"{heads.__name__}.winner_mse", None)


class _Api:
    """A fastpref namespace that exports one extra function (as a fresh import would)."""

    def __init__(self, fn):
        self.winner_mse_loss = fn
        self.__all__ = ["winner_mse_loss"]
        self.METHODS = {"winner_mse": fn}
