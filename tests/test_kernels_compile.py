"""The kernels compile for a real GPU even where there is none: every kernel family (and every
head) is compiled for sm_90 through Triton's whole NVIDIA pipeline (the opt-in one-launch forward
too) (frontend, MLIR, LLVM,
ptxas), in a subprocess with the interpreter off. CPU runs use the interpreter, which accepts
constructs the compiler rejects; this catches those before a GPU run does. It also checks
that the NaN carry of the non-finite rule (x + 0 * x) survives code generation."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import re
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpref.kernels import fused, grad, head, reduce

    target = GPUTarget("cuda", 90, 32)

    def build(fn, signature, constexprs):
        # a kernel that derives ACC from a pointer's element type takes no ACC argument
        constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        return triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs), target=target)

    for has_ref, cross in ((True, False), (False, False), (True, True)):
        build(reduce._row_sums_kernel,
              dict(p_ptr="*bf16", r_ptr="*fp16", t_ptr="*fp32", part_ptr="*fp32", part_start="i32", n="i32",
                   chunk="i32", rows="i32", splits="i32", stride_p="i32", stride_r="i32", stride_t="i32"),
              dict(HAS_REF=has_ref, CROSS=cross, BLOCK=reduce.BLOCK))
    for dtype, has_b in (("*bf16", True), ("*fp32", False), ("*fp16", True)):
        build(grad._grad_kernel,
              dict(p_ptr=dtype, r_ptr="*fp32", t_ptr="*fp32", coef_ptr="*fp32", coef_start="i32", gout_ptr="*fp32",
                   grad_ptr=dtype, n="i32", rows="i32", stride_p="i32", stride_r="i32", stride_t="i32"),
              dict(HAS_B=has_b, BLOCK=grad.BLOCK, RNE_BF16=False))
    # Every registered head, with the options that change its code the most: the head kernel's
    # runtime tuple is typed from the head's own parameter names (kernels/method.py).
    from fastpref.kernels.registry import REGISTRY
    types = dict(part_ptr="*fp32", rows="i32", B="i32", count="i32", splits="i32", inv_n=("fp32", "fp32"),
                 loss_ptr="*fp32", stats_ptr="*fp32", ints_ptr="*fp32", coef_ptr="*fp32", labels="*i64",
                 timesteps="*i64", kl_tensor="*fp32", emb_w="*fp32", emb_l="*fp32", emb_w_len="i32")
    # Each method with its default options, then with each other choice of each option.
    cases = [(name, {}) for name in REGISTRY]
    cases += [(name, {o.name: choice}) for name, m in REGISTRY.items() for o in m.options for choice in o.choices[1:]]
    cases.append(("sdpo", dict(base="dspo", dspo_variant="sdxl")))
    for name, options in cases:
        method = REGISTRY[name]
        args = tuple(types.get(p, ("i32", "i32") if p.endswith("_strides") else ("fp32", "fp32"))
                     for p in method.head_params())
        sig = dict(args=args, starts=("i32", "i32", "i32"),
                   HEAD="constexpr", C="constexpr", ACC="constexpr", NP="constexpr", SP="constexpr")
        kernel = triton.compile(ASTSource(head._head_kernel, signature=sig, constexprs=dict(
            HEAD=method.head, C=method.config(options), ACC=tl.float32, NP=8, SP=4)), target=target)
        if options == {} and name in ("dpo", "sdpo", "sft"):  # the opt-in one-launch forward, same heads
            cross = method.cross
            fsig = dict(p_ptr="*bf16", r_ptr="*bf16", t_ptr="*fp32", part_ptr="*fp32", ticket_ptr="*i32", n="i32",
                        chunk="i32", rows="i32", splits="i32", stride_p="i32", stride_r="i32", stride_t="i32",
                        args=args, starts=("i32", "i32", "i32"))
            fsig.update({k: "constexpr" for k in ("HAS_REF", "CROSS", "BLOCK", "HEAD", "C", "ACC", "NP", "SP")})
            one = triton.compile(ASTSource(fused._row_sums_head_kernel, signature=fsig, constexprs=dict(
                HAS_REF=method.needs_ref, CROSS=cross, BLOCK=reduce.BLOCK, HEAD=method.head, C=method.config({}),
                ACC=tl.float32, NP=8, SP=4)), target=target)
            ptx = one.asm["ptx"]
            ticket = ptx.index("atom.global.gpu.acq_rel.add")  # the ticket: an acquire/release atomic,
            assert "bar.sync" in ptx[:ticket], "no barrier orders the partials' stores before the ticket"
        if name == "sft":   # SFT: S_pt + 0 * S_pt is kept (an FMA with 0), not folded to S_pt
            assert re.search(r"fma\\.rn\\.f32\\s+%\\w+, %\\w+, 0f00000000", kernel.asm["ptx"]), "NaN carry folded away"
    print("COMPILED", len(cases) + 9)
""")


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as error:  # no NVIDIA backend, or no ptxas in this Triton
        pytest.skip(f"this Triton cannot compile for sm_90: {error}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # fastpref.kernels as installed, compiled
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took more than 300 s")
    assert out.returncode == 0 and "COMPILED" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]
