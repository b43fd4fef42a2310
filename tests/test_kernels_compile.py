"""The kernels compile for a real GPU even where there is none: every kernel family (and every
head) is compiled for sm_90 through Triton's whole NVIDIA pipeline (frontend, MLIR, LLVM,
ptxas), in a subprocess with the interpreter off. CPU runs use the interpreter, which accepts
constructs the compiler rejects; this catches those before a GPU run does. It also checks
that the NaN carry of the non-finite rule (x + 0 * x) survives code generation."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import grad, head, reduce

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        return triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs), target=target)

    for has_ref, cross in ((True, False), (False, False), (True, True)):
        build(reduce._row_sums_kernel,
              dict(p_ptr="*bf16", r_ptr="*fp16", t_ptr="*fp32", part_ptr="*fp32", n="i32", chunk="i32", rows="i32",
                   splits="i32", stride_p="i32", stride_r="i32", stride_t="i32"),
              dict(HAS_REF=has_ref, CROSS=cross, ACC=tl.float32, BLOCK=reduce.BLOCK))
    for dtype, has_b in (("*bf16", True), ("*fp32", False), ("*fp16", True)):
        build(grad._grad_kernel,
              dict(p_ptr=dtype, r_ptr="*fp32", t_ptr="*fp32", coef_ptr="*fp32", gout_ptr="*fp32", grad_ptr=dtype,
                   n="i32", rows="i32", stride_p="i32", stride_r="i32", stride_t="i32"),
              dict(HAS_B=has_b, ACC=tl.float32, BLOCK=grad.BLOCK, RNE_BF16=False))
    signature = dict(part_ptr="*fp32", rows="i32", B="i32", splits="i32", inv_n_hi="fp32", inv_n_lo="fp32")
    for i in range(head.NUM_HYPER):
        signature.update({f"h{i}_hi": "fp32", f"h{i}_lo": "fp32"})
    signature.update(aux0_ptr="*i64", aux1_ptr="*fp32", aux_len="i32", a0s0="i32", a0s1="i32", a1s0="i32",
                     a1s1="i32", loss_ptr="*fp32", stats_ptr="*fp32", ints_ptr="*i64", coef_ptr="*fp32")
    # (method, variant, flag): every head, with the variants that change its code the most.
    cases = [(0, 1, False), (1, 0, False), (2, 1, False), (3, 0, True), (4, 0, False), (5, 1, False), (6, 0, False),
             (7, 0, False), (8, 0, False), (9, 2, True), (10, 0, False)]
    for method, variant, flag in cases:
        sig = dict(signature, aux0_ptr="*fp32") if method == 3 else signature
        kernel = build(head._head_kernel, sig, dict(METHOD=method, VARIANT=variant, FLAG=flag, ACC=tl.float32,
                                                   NP=8, SP=4, DC=64))
        if method == 1:   # SFT: S_pt + 0 * S_pt is kept (an FMA with 0), not folded to S_pt
            assert re.search(r"fma\\.rn\\.f32\\s+%\\w+, %\\w+, 0f00000000", kernel.asm["ptx"]), "NaN carry folded away"
    print("COMPILED", len(cases) + 6)
''')


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as error:                       # no NVIDIA backend, or no ptxas in this Triton
        pytest.skip(f"this Triton cannot compile for sm_90: {error}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": root}
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took more than 300 s")
    assert out.returncode == 0 and "COMPILED" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]
