"""Which arithmetic each TFLite backend uses, per op: the per-backend kernel rules of docs/numerics.md as data.

Kernels look their rounding up here instead of branching on the backend name, so the differences
between the backends live in one table. Each rule name is implemented once, in the kernel module of its op
(see `kernels.py`).
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["BACKENDS", "RULES", "XNNPACK_OPS", "REFERENCE_LACKS", "rules_for"]

from ..backends import BACKENDS  # the one definition (verify/backends.py)

_REFERENCE = {
    "conv": "gemmlowp",            # MultiplyByQuantizedMultiplier, double rounding
    "depthwise": "gemmlowp",
    "grouped_conv": "gemmlowp",    # CONV_2D with filter channels < input channels
    "transpose_conv": "gemmlowp",  # reference_integer_ops::TransposeConv: per-channel MBQM
    "fully_connected": "float64",  # round_half_away(double(acc) * double multiplier)
    "fc_multiplier": "double",     # s_in * s_w / s_out in double
    "batch_matmul": "gemmlowp",    # reference BatchMatMul: MBQM of the int32 sum, float32(s_a * s_b) / s_out
    "add": "gemmlowp",             # left_shift 20, three double-rounding MBQMs
    "sub": "result",               # SUB: ADD's input scalings, then scaled1 - scaled2
    "mul": "gemmlowp",             # MBQM(prod, s1*s2/s_out in double)
    "mean": "reference",           # QuantizedMeanOrSum: multiplier << k / N, biased rounding
    "quantize": "div_half_away",   # TfLiteRound(x / scale) + zp, float32
    "requantize": "gemmlowp",
    "dequantize": "exact",         # float32(double(s) * (q - zp)): one rounding
    "lut": "tflite",               # LUTPopulate: float32, libm, round half away
    "softmax": "fixed_point",      # gemmlowp exp / reciprocal
    "activation_range": "tflite",  # zp + TfLiteRound(f / scale)
    "leaky_relu": "reference",     # MBQM(x - zp) by identity or alpha multiplier; float32 scale arithmetic
    "resize_bilinear": "integer10",  # ResizeBilinearInteger (also the optimized int8 kernel): 10-bit weights
}

_BUILTIN = {
    **_REFERENCE,
    "conv": "ruy",                 # x86 ruy: two round-half-up steps
    "depthwise": "ruy8",           # AVX2 blocks of 8 channels like ruy, remainder channels gemmlowp
    "fully_connected": "ruy",
    # TransposeConvV2 requantizes with optimized_ops::Quantize: 8-channel NEON_2_SSE blocks (vqrdmulh, then a
    # half-up rounding shift, like ruy), the remainder channels with the scalar gemmlowp MBQM
    "transpose_conv": "ruy8",
    # Inherited from _REFERENCE, found by testing: grouped CONV_2D runs the reference per-channel conv
    # (gemmlowp, not ruy); BatchMatMul of two int8 activations rounds like the reference (gemmlowp), unlike FC.
    "fc_multiplier": "float_product",  # GetQuantizedConvolutionMultipler: float(s_in * s_w) / s_out
    # optimized int8 ADD: the calls of `elementwise.broadcast_calls` (the whole tensor, or runs of the five-fold
    # broadcast). AddElementwise: 16-lane blocks scale the inputs with one rounding (shift by 20 + shift, then
    # the rounding multiply); AddScalarBroadcast: 8-lane blocks round the multiply, then truncate the shift.
    # Both SIMD bodies wrap results to int16 before the clamp; the scalar tails are all gemmlowp.
    "add": "simd16_int16wrap",
    "sub": "reference_kernel",     # int8 SUB (broadcast or not) runs reference_ops in the optimized resolver
    # optimized_integer_ops::Mean (4-D, axes {1, 2}, keep_dims): raw sum, float32 bias and multiplier;
    # 16-channel SIMD blocks round like ruy (half up), remainder channels gemmlowp. Other means: reference.
    "mean": "simd16ch_ruy_tail_gemmlowp",
    "quantize": "simd8_mul_even_tail_ddiv_away",  # 8-lane blocks: x * (1/s) half even; tail: x / s in double
    "requantize": "simd16_ruy_tail_gemmlowp",     # 16-lane blocks: ruy rounding; tail: gemmlowp
    "dequantize": "simd8_two_step",  # blocks of 8: f32(q * s) + f32(-zp * s); tail: one rounding
    "softmax": "float_table",      # expf table, float32 sum, round half away
}

_XNNPACK = {
    **_BUILTIN,
    "conv": "fp32",                # float32(acc) * f32(f32(s_in*s_w)/s_out), round half even
    "depthwise": "fp32",
    "grouped_conv": "fp32",
    "batch_matmul": "fp32",        # taken only when the second operand has zero point 0 (else builtin)
    "transpose_conv": "fp32",      # qs8/qc8 deconvolution: the conv's fp32 requantization
    "fully_connected": "fp32",
    "add": "xnnpack",              # qs8 vadd fixed point, arithmetic shift
    "sub": "multiplier",           # qs8 vsub = vadd with the second multiplier negated
    "mul": "fp32",
    "mean": "fp32",
    "requantize": "xnnpack",       # qs8 convert: 8 fractional bits
    "dequantize": "exact",
    "quantize": "mul_half_even",   # x * (1/scale), float32, round half even
    "lut": "xnnpack",              # function in double -> float32, lrintf (half even)
    "activation_range": "xnnpack",  # lrintf(f / scale + zp)
    "leaky_relu": "xnnpack",       # qs8 vlrelu: lrintf(256 * ratio), (d * m + 128) >> 8 + zp
    "resize_bilinear": "xnnpack",  # s8 ibilinear: float32 coordinates, 11-bit weights, (acc + 2^21) >> 22
}

RULES = MappingProxyType({
    "reference": MappingProxyType(_REFERENCE),
    "builtin": MappingProxyType(_BUILTIN),
    "xnnpack": MappingProxyType(_XNNPACK),
})

# Int8 ops the XNNPACK delegate takes (seen with ai-edge-litert 2.3.0 on x86); any other op runs the
# builtin optimized kernel even in the default (XNNPACK) interpreter (`base._xnnpack_accepts` adds the
# delegate's per-node conditions, e.g. BATCH_MATMUL only with a zero-point-0 second operand).
# Int8 ops it leaves (builtin kernels run them): RELU, RELU6, RELU_N1_TO_1, HARD_SWISH, GELU, MAXIMUM, MINIMUM,
# GATHER, SPLIT_V, RESIZE_NEAREST_NEIGHBOR, PADV2 with a pad value other than the zero point.
#
# Ops with one formula on every backend (no rule here): the copies (TRANSPOSE, SLICE, STRIDED_SLICE, SPLIT,
# SPLIT_V, GATHER, RESIZE_NEAREST_NEIGHBOR, MAXIMUM/MINIMUM on raw codes), RELU/RELU6/RELU_N1_TO_1 (ReluX:
# MBQM of x - zp with float32(s_in / s_out), then the activation clamp), HARD_SWISH (the reference int16
# fixed-point kernel; the optimized one matched it on every code) and GELU (TFLite's float32 table with
# C tanhf, rounded half away: the "tflite" lut rule).
XNNPACK_OPS = frozenset({
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "MAX_POOL_2D", "MEAN",
    "CONCATENATION", "RESHAPE", "PAD", "PADV2", "QUANTIZE", "DEQUANTIZE", "LOGISTIC", "TANH", "LEAKY_RELU",
    "TRANSPOSE", "STRIDED_SLICE", "SPLIT", "RESIZE_BILINEAR", "TRANSPOSE_CONV", "BATCH_MATMUL",
})


# Int8 ops (their int8 op versions) that the reference resolver (BUILTIN_REF) does not register in
# ai-edge-litert 2.3.0: the interpreter refuses such a model on "reference", and so does the emulator.
REFERENCE_LACKS = frozenset({"DEPTH_TO_SPACE", "TILE"})


def rules_for(backend: str, op_name: str) -> MappingProxyType:
    """The rule set that runs `op_name` on `backend` (XNNPACK falls back to builtin for ops it leaves)."""
    if backend == "xnnpack" and op_name not in XNNPACK_OPS:
        return RULES["builtin"]
    return RULES[backend]
