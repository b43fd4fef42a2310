#!/usr/bin/env bash
# Run one benchmark job on the GPU machine, unattended, from the repository root.
#
#   bash benchmarks/run_gpu.sh quick        # loss blocks, headline subset        (~2-3 min)
#   bash benchmarks/run_gpu.sh dpo          # full sweep, Diffusion-DPO sigmoid    (~4 min)
#   bash benchmarks/run_gpu.sh dspo         # full sweep, DSPO sd15                (~4 min)
#   bash benchmarks/run_gpu.sh full         # both default methods in one run (may hit --budget-s)
#   bash benchmarks/run_gpu.sh more         # every other method: bf16, SD1.5-512 + SDXL, B=8, fwd+bwd (~3 min)
#   bash benchmarks/run_gpu.sh train-quick  # training step, B = 4                (~1-2 min)
#   bash benchmarks/run_gpu.sh train        # training step, B = 1,4,8             (~2-4 min)
#   bash benchmarks/run_gpu.sh train-sweep  # the diffusers script's step vs each trainer speed option and the
#                                           # full stack, SD1.5-512, LoRA r8, bf16, B = 4 (~4-6 min, unmeasured)
#   bash benchmarks/run_gpu.sh pytest       # pytest-benchmark file               (~1-2 min)
#   bash benchmarks/run_gpu.sh train-tests  # the trainer's GPU tests: captured step, --cuda_graph runs vs eager twins
#   bash benchmarks/run_gpu.sh tests        # the whole test suite, kernels compiled   (~3-5 min)
#   bash benchmarks/run_gpu.sh one-launch   # stress test of the opt-in one-launch forward (bitwise)  (~2-4 min)
#   bash benchmarks/run_gpu.sh compile-tests # the losses under torch.compile/export on CUDA (triton_op path) (~2-4 min)
#   bash benchmarks/run_gpu.sh families     # one real-size LoRA DPO step per family at random init: SDXL 1024 px,
#                                           # SD3-medium and FLUX.1-dev 512 px, bf16, rank 8, SDPA (~4-6 min)
#   bash benchmarks/run_gpu.sh flow-sweep   # flow families: a flow_grpo-style step (four sequential forwards) vs
#                                           # fastpref's with each speed option and the full stack, SD3-medium and
#                                           # FLUX.1-dev 512 px, LoRA r8, bf16, 2 pairs (~4-5 min, unmeasured)
#   bash benchmarks/run_gpu.sh wan          # one Wan2.1-1.3B-config DPO step, 480x832, 33 frames (else 17, 9), bf16, LoRA r8 (~2-4 min)
#   bash benchmarks/run_gpu.sh fsdp-memory  # peak memory of one full fine-tuning step with a reference copy, SDXL
#                                           # 1024 px: unsharded, --fsdp, --fsdp + CPU offload (one GPU) (~3-5 min)
#
# The train* and tests jobs need diffusers, which the GPU image lacks: keep its wheel (and
# importlib_metadata's) in .whl/ (git-ignored) and carry that folder; they are installed
# with --no-deps when diffusers is missing.
#
# Several jobs run in one call, in order: `bash benchmarks/run_gpu.sh train-tests train pytest`;
# a failing job is reported and the next one still runs (the exit status is the first failure's).
#
# Results go to benchmarks/results/, or, with $OUT set (the device tool's return folder, which
# takes at most 8 files), into one archive $OUT/gpu-results.tar.gz. Unpack it into
# benchmarks/results/ (`tar xzf gpu-results.tar.gz -C benchmarks/results`) and run
# `python benchmarks/make_results.py` afterwards.
# Times above are estimates until a first run records them (elapsed_s in each .meta.json).
set -euo pipefail
jobs=("${@:-quick}")
for job in "${jobs[@]}"; do
    case "$job" in
        quick|dpo|dspo|full|more|train-quick|train|train-sweep|train-tests|tests|pytest|one-launch|compile-tests|families|wan|fsdp-memory|flow-sweep) ;;
        *) echo "unknown job '$job'" >&2; exit 2 ;;
    esac
done
if [ -n "${OUT:-}" ]; then dest="$(mktemp -d)"; else dest="benchmarks/results"; fi
mkdir -p "$dest"
PY="${PYTHON:-python3}"

# fastpref must be installed (its kernels package is mapped by setuptools); no network needed
if ! "$PY" -c "import fastpref" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . || {
        echo "could not install fastpref from this checkout" >&2; exit 2; }
fi
case " ${jobs[*]} " in *" train"*|*" tests "*|*" families "*|*" wan "*|*" fsdp-memory "*|*" flow-sweep "*)
    if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
        ls .whl/diffusers-*.whl >/dev/null 2>&1 || { echo "the train jobs need diffusers: carry .whl/ with its wheel" >&2; exit 2; }
        "$PY" -m pip install -q --no-deps .whl/diffusers-*.whl .whl/importlib_metadata-*.whl
    fi
    if ! "$PY" -c "import peft" >/dev/null 2>&1 && ls .whl/peft-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps .whl/peft-*.whl  # LoRA of the family-step job and the trainer
    fi ;;
esac
"$PY" -c "import torch, triton, fastpref; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'fastpref', fastpref.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

run_job() {
    local job="$1"
    export FASTPREF_BENCH_VIA="bash benchmarks/run_gpu.sh $job"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv > "$dest/nvidia-smi-$job.txt" 2>&1 || true
    case "$job" in
        quick) "$PY" benchmarks/bench_losses.py --quick --out "$dest/losses_quick.csv" ;;
        dpo)   "$PY" benchmarks/bench_losses.py --methods dpo_sigmoid --out "$dest/losses_dpo.csv" ;;
        dspo)  "$PY" benchmarks/bench_losses.py --methods dspo_sd15 --out "$dest/losses_dspo.csv" ;;
        full)  "$PY" benchmarks/bench_losses.py --out "$dest/losses.csv" ;;
        more)  "$PY" benchmarks/bench_losses.py \
                   --methods dpo_hinge,dpo_ipo,sft,dspo_sdxl,rpo,rpo_diagonal,sspo,dense_dpo,kto,mapo,sdpo,dmpo \
                   --dtypes bf16 --shapes sd15_512,sdxl_1024 --batches 8 --modes full \
                   --providers fastpref,eager-diffusers,eager-official,eager-spec,compile \
                   --out "$dest/losses_more.csv" ;;
        train-quick) "$PY" benchmarks/bench_train_step.py --quick --out "$dest/train_step_quick.csv" ;;
        train) "$PY" benchmarks/bench_train_step.py --out "$dest/train_step.csv" ;;
        train-sweep) "$PY" benchmarks/bench_train_step.py --sweep --quick --out "$dest/train_step_sweep_quick.csv" ;;
        train-tests) "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_train_cuda_graph.py tests/test_train_static_step.py \
                   tests/test_train_speed.py tests/test_train_latent_cache.py tests/test_bench_train_step_smoke.py \
                   tests/test_bench_family_sweep.py 2>&1 | tee "$dest/pytest_train_gpu.txt" ;;
        tests) "$PY" -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee "$dest/pytest_gpu.txt" ;;
        one-launch) "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_one_launch.py 2>&1 | tee "$dest/pytest_one_launch.txt" ;;
        compile-tests) "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_compile_ops.py tests/test_kernels_compile.py \
                   2>&1 | tee "$dest/pytest_compile_gpu.txt" ;;
        families) "$PY" benchmarks/bench_family_step.py --steps 5 --out "$dest/family_step.csv" ;;
        flow-sweep) "$PY" benchmarks/bench_family_step.py --sweep --pairs 2 --steps 5 --warmup 2 \
                   --out "$dest/family_sweep.csv" ;;
        wan)   "$PY" benchmarks/bench_wan_step.py --out "$dest/wan_step.csv" ;;
        fsdp-memory) "$PY" benchmarks/bench_fsdp_memory.py --family sdxl --out "$dest/fsdp_memory.csv" ;;
        pytest) "$PY" -m pytest benchmarks/test_bench_losses.py --benchmark-only -q -p no:cacheprovider \
                   --benchmark-json="$dest/pytest_benchmark.json" ;;
    esac
}

status=0
for job in "${jobs[@]}"; do
    echo "=== job $job ($(date -u +%H:%M:%S) UTC)"
    start=$SECONDS
    if run_job "$job"; then
        echo "=== job $job done in $((SECONDS - start)) s"
    else
        code=$?
        echo "=== job $job FAILED (exit $code) after $((SECONDS - start)) s" >&2
        [ "$status" -ne 0 ] || status=$code
    fi
done
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-results.tar.gz" -C "$dest" .
    echo "packed $(ls "$dest" | wc -l) files into \$OUT/gpu-results.tar.gz"
fi
exit "$status"
