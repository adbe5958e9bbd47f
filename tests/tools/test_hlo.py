"""The profilers' HLO table (xlstm_jax/bench/hlo.py): instructions, their name stacks, which are matmuls, and the
floating-point operations of a dot, a cuBLAS GEMM custom call and a Triton GEMM fusion, and of a whole module."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xlstm_jax.bench.hlo import instruction_of, is_matmul, matmul_flops, module_matmul_flops, op_name, parse_hlo

# The shape of a GPU module's text (jax 0.11 on an H100): a cuBLAS GEMM custom call with a tuple result and its
# dimension numbers in the JSON backend config, and an XLA Triton GEMM fusion whose computation holds the dot.
GPU_TEXT = """\
%gemm_fusion_dot.7_computation (parameter_0: bf16[64,32], parameter_1: f32[32,48]) -> bf16[64,48] {
  %parameter_0 = bf16[64,32]{1,0} parameter(0)
  %parameter_1 = f32[32,48]{1,0} parameter(1)
  %convert.1 = bf16[32,48]{1,0} convert(%parameter_1)
  ROOT %dot.7 = bf16[64,48]{1,0} dot(%parameter_0, %convert.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[4,16,32], w: f32[32,48], v: bf16[32,8]) -> (bf16[64,48], bf16[4,16,8]) {
  %x = bf16[4,16,32]{2,1,0} parameter(0)
  %w = f32[32,48]{1,0} parameter(1)
  %v = bf16[32,8]{1,0} parameter(2)
  %bitcast.3 = bf16[64,32]{1,0} bitcast(%x)
  %gemm_fusion_dot.7 = bf16[64,48]{1,0} fusion(%bitcast.3, %w), kind=kCustom, calls=%gemm_fusion_dot.7_computation, metadata={op_name="jit(step)/jvp(ffn)/dot_general"}
  %custom-call.2 = (bf16[4,16,8]{2,1,0}, s8[1024]{0}) custom-call(%x, %v), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/jvp(project)/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["0"]}}}
  %get-tuple-element.1 = bf16[4,16,8]{2,1,0} get-tuple-element(%custom-call.2), index=0
  ROOT %tuple = (bf16[64,48]{1,0}, bf16[4,16,8]{2,1,0}) tuple(%gemm_fusion_dot.7, %get-tuple-element.1)
}
"""


def test_gemm_custom_calls_and_triton_gemm_fusions_count_their_flops():
    hlo = parse_hlo(GPU_TEXT)
    assert hlo["custom-call.2"]["dims"] == [4, 16, 8] and hlo["custom-call.2"]["contracting"] == [2]
    assert matmul_flops(hlo, "custom-call.2") == 2 * 4 * 16 * 8 * 32
    assert matmul_flops(hlo, "gemm_fusion_dot.7") == 2 * 64 * 48 * 32
    assert matmul_flops(hlo, "get-tuple-element.1") == 0 and matmul_flops(hlo, "missing") == 0
    assert is_matmul(hlo, "gemm_fusion_dot.7") and is_matmul(hlo, "custom-call.2")
    assert not is_matmul(hlo, "bitcast.3")
    assert op_name(hlo, "custom-call.2") == "jit(step)/jvp(project)/dot_general"
    # a kernel named after its fusion, "_N" for ".N", when the event carries no hlo_op
    assert instruction_of({"name": "gemm_fusion_dot_7", "args": {}}, hlo) == "gemm_fusion_dot.7"


def test_a_compiled_module_s_dots_count_2mnk():
    f = jax.jit(lambda a, b, c: jnp.tanh(jnp.einsum("bsd,dn->bsn", a, b)) @ c)
    hlo = parse_hlo(f.lower(jnp.ones((2, 8, 16)), jnp.ones((16, 4)), jnp.ones((4, 5))).compile().as_text())
    flops = sorted(matmul_flops(hlo, name) for name, info in hlo.items()
                   if not name.startswith("computation:") and info["opcode"] == "dot")
    assert flops == [2 * 16 * 5 * 4, 2 * 16 * 4 * 16]


def test_a_module_s_matmul_flops_count_loop_bodies_by_their_trip_counts():
    """Five scanned matmuls and the costlier branch of a conditional: 6 x 2mnk. The profiler divides this by the
    matmul kernels' device time where it cannot match GEMM events to instructions (command buffers on a GPU)."""
    def f(x, w):
        y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)
        return jax.lax.cond(y.sum() > 0, lambda y: y @ w, lambda y: y, y)

    hlo = parse_hlo(jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((16, 16))).compile().as_text())
    assert sorted(info["trip_count"] for name, info in hlo.items()
                  if not name.startswith("computation:") and info["opcode"] == "while") == [5]
    assert module_matmul_flops(hlo) == 6 * 2 * 8 * 16 * 16
    assert module_matmul_flops(parse_hlo(GPU_TEXT)) == 2 * 64 * 48 * 32 + 2 * 4 * 16 * 8 * 32
