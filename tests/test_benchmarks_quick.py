"""CI check of the benchmark suite's CPU quick mode (no GPU, no timing assertions).

Runs ``benchmarks/bench_losses.py --cpu-quick`` on a few methods in a subprocess (so this
suite's fixtures cannot disturb the counts), then checks that the CSV is well-formed, that
fastpref shows no host sync and that the sync counter does see the upstream DSPO-SDXL
block's host-side branch.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
METHODS = "dpo_sigmoid,sft,dspo_sd15,dspo_sdxl"


@pytest.fixture(scope="module")
def quick_csv(tmp_path_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip(
            "the CPU quick mode runs fastpref under Triton's interpreter; on a CUDA machine the GPU "
            "benchmark jobs (benchmarks/run_gpu.sh) measure these figures"
        )
    out = str(tmp_path_factory.mktemp("bench") / "cpu_quick.csv")
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["TRITON_INTERPRET"] = "1"  # CPU tensors, even on a CUDA machine (device-independent figures)
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(BENCH, "bench_losses.py"),
            "--cpu-quick",
            "--device",
            "cpu",
            "--methods",
            METHODS,
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _rows(path):
    sys.path.insert(0, BENCH)
    try:
        import csv_io

        return csv_io.validate(path), csv_io.read_meta(path)
    finally:
        sys.path.remove(BENCH)


def test_csv_well_formed(quick_csv):
    rows, meta = _rows(quick_csv)
    assert meta["command"].startswith("python ")
    assert {r["metric_name"] for r in rows} >= {
        "peak_extra_memory",
        "peak_extra_over_input",
        "host_syncs",
        "aten_ops",
        "triton_launches",
    }
    assert {r["kernel_operation_mode"] for r in rows} == {"forward", "full"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}


def test_fastpref_has_no_host_sync(quick_csv):
    rows, _ = _rows(quick_csv)
    syncs = [r for r in rows if r["kernel_provider"] == "fastpref" and r["metric_name"] == "host_syncs"]
    assert syncs, "no fastpref rows: is fastpref importable?"
    bad = [
        (r["kernel_name"], r["kernel_operation_mode"], r["dtype"], r["shape_name"])
        for r in syncs
        if r["y_value_50"] != 0
    ]
    assert not bad, f"fastpref host syncs in {bad}"


def test_fastpref_launches_triton_kernels(quick_csv):
    rows, _ = _rows(quick_csv)
    launches = [
        r["y_value_50"] for r in rows if r["kernel_provider"] == "fastpref" and r["metric_name"] == "triton_launches"
    ]
    assert launches and min(launches) >= 1


def test_sync_counter_sees_upstream_host_branch(quick_csv):
    rows, _ = _rows(quick_csv)
    syncs = [
        r["y_value_50"]
        for r in rows
        if r["kernel_name"] == "dspo_sdxl"
        and r["kernel_provider"] == "eager-official"
        and r["metric_name"] == "host_syncs"
    ]
    assert syncs and min(syncs) >= 1


def test_results_page_says_no_gpu_figures(quick_csv, tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "make_results.py"), quick_csv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No GPU figure has been measured yet" in out.read_text()


# --- the benchmarked eager blocks compute the same loss as fastpref (like is compared with like)


def _bench_modules():
    sys.path.insert(0, BENCH)
    try:
        import providers
        import registry
        import shapes

        return registry, providers, shapes
    finally:
        sys.path.remove(BENCH)


_REGISTRY, _PROVIDERS, _SHAPES = _bench_modules()
_PAIRS = [(m, p) for m in _REGISTRY.METHODS for p in _REGISTRY.METHODS[m].eager]


@pytest.mark.parametrize("method_name,provider", _PAIRS, ids=[f"{m}-{p}" for m, p in _PAIRS])
def test_eager_block_matches_fastpref(method_name, provider, device):
    import torch

    method = _REGISTRY.METHODS[method_name]
    assert _PROVIDERS.fastpref_fn(method) is not None, f"fastpref has no {method.fastpref}"
    args, tkw = _SHAPES.make_inputs(method, "tiny", 2, torch.float32, device.type)
    grads, losses = [], []
    for p in ("fastpref", provider):
        x = args[0].detach().clone().requires_grad_(True)
        loss, _ = _PROVIDERS.build(method, p)(x, *args[1:], **tkw)
        loss.backward()
        losses.append(loss.detach().double())
        grads.append(x.grad.double())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-6)
    scale = grads[0].abs().max().clamp_min(1e-12)
    torch.testing.assert_close(grads[1] / scale, grads[0] / scale, rtol=0, atol=2e-3)


def test_run_gpu_refuses_an_unknown_job_before_running_any(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(
        ["bash", os.path.join(BENCH, "run_gpu.sh"), "quick", "nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "unknown job 'nonsense'" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing may run or be written before the job list is checked"


def test_run_gpu_script_parses_and_every_job_runs_files_that_exist():
    """What a GPU session runs unattended (`bash benchmarks/run_gpu.sh train-tests train pytest`,
    `... dspo tests`): the script parses, every job it accepts has a branch, and every test
    file or benchmark script a job names is in the checkout."""
    import re

    script = os.path.join(BENCH, "run_gpu.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = open(script).read()
    accepted = re.search(r"^\s+((?:[\w-]+\|)+[\w-]+)\) ;;$", text, re.M).group(1).split("|")
    assert {"train-tests", "train", "pytest", "dspo", "tests"} <= set(accepted)
    body = text[text.index("run_job() {") :]
    branches = re.findall(r"^\s+([\w-]+)\)", body, re.M)
    assert sorted(branches) == sorted(accepted), "a job without a branch, or a branch without a job"
    named = set(re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)\b", body))
    assert "tests/test_train_cuda_graph.py" in named and "tests/test_train_static_step.py" in named
    missing = [path for path in sorted(named) if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"run_gpu.sh names files that do not exist: {missing}"
