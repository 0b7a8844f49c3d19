"""The emulator's kernels for the ops real torchvision/timm models, detectors and segmenters produce, against
the interpreter on its three backends: 0 mismatched elements on every tensor of every sample.

Each model is a tiny TF graph converted int8 by the real TFLiteConverter with the oracle helpers of
tests/tflite_oracle.py: fake-quant graphs (power-of-two scales put many requantizations exactly on ties), or float
graphs calibrated with a representative dataset where fake-quant cannot express the op (per-channel
transposed filters). The inputs: saturated, zero-point and all-codes samples, then 300 random ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_emulate_kernels import MODEL_SET_OPS
from tests.tflite_oracle import BACKENDS, compare_all, pow2_range, run_interpreter
from xqat.tflite.model import read_tflite
from xqat.verify.emulate import SUPPORTED_OPS

N_RANDOM = 300


def sample_codes(model: bytes, rng, n: int = N_RANDOM) -> list[np.ndarray]:
    """Per input: n random codes, then all -128, all 127, all zero-point, and every code tiled."""
    m = read_tflite(model)
    out = []
    for i in m.inputs:
        t = m.tensor(i)
        shape = tuple(t.shape[1:])
        size = int(np.prod(shape))
        special = [np.full(shape, -128), np.full(shape, 127), np.full(shape, int(t.zero_points[0])),
                   np.resize(np.arange(-128, 128), size).reshape(shape),
                   np.resize(np.arange(127, -129, -1), size).reshape(shape)]
        rand = rng.integers(-128, 128, (n, *shape))
        out.append(np.concatenate([np.stack(special), rand]).astype(np.int8))
    return out


def check(model: bytes, backend: str, ops: set[str], seed: int = 0) -> None:
    m = read_tflite(model)
    assert ops <= {op.name for op in m.ops}, [op.name for op in m.ops]
    bad, total = compare_all(model, sample_codes(model, np.random.default_rng(seed)), backend)
    assert bad == 0, f"{bad} of {total} elements differ ({backend}, ops {[op.name for op in m.ops]})"
    assert total > 0


# ---------------------------------------------------------------------------------------------
# Activations: piecewise-linear ones and GELU (tanh and exact erf forms)

_ACT_RANGES = [  # (input range, output range): power-of-two ratios (ties) and arbitrary ones
    (pow2_range(128, 5), pow2_range(8, 5)), (pow2_range(100, 4), pow2_range(30, 6)),
    ((-3.7, 5.1), (-0.43, 4.9)), ((-9.0, 7.0), (-0.5, 6.3)),
]


@pytest.fixture(scope="module")
def activation_models(builder):
    tf, fq = builder.tf, builder.fq
    models = []
    for r_in, r_out in _ACT_RANGES:
        @tf.function(input_signature=builder.spec([1, 5, 5, 11]))
        def f(x, r_in=r_in, r_out=r_out):
            x = fq(x, r_in)
            return {"hswish": fq(x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0), r_out),
                    "relu": fq(tf.nn.relu(x), (0.0, r_out[1])),
                    "relu6": fq(tf.nn.relu6(x), r_out),
                    "relu1": fq(tf.clip_by_value(x, -1.0, 1.0), (-1.0, 1.0)),
                    "gelu": fq(tf.nn.gelu(x, approximate=True), r_out),
                    "leaky": fq(tf.nn.leaky_relu(x, 0.1), (r_out[0] - 0.3, r_out[1])),
                    "leaky2": fq(tf.nn.leaky_relu(x, 0.25), r_in)}
        models.append(builder.convert(f))

        @tf.function(input_signature=builder.spec([1, 4, 64]))
        def exact_gelu(x, r_in=r_in, r_out=r_out):  # its own graph: the converter fuses erf GELU of a lone input
            return fq(tf.nn.gelu(fq(x, r_in), approximate=False), r_out)
        models.append(builder.convert(exact_gelu))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectifiers(activation_models, backend):
    for model in activation_models[0::2]:
        check(model, backend, {"HARD_SWISH", "RELU", "RELU6", "RELU_N1_TO_1", "LEAKY_RELU", "GELU"})
    for model in activation_models[1::2]:
        assert [op.options.get("approximate") for op in read_tflite(model).ops if op.name == "GELU"] == [False]
        check(model, backend, {"GELU"})


# ---------------------------------------------------------------------------------------------
# Binary elementwise: SUB, broadcast MUL (squeeze-excite gate), broadcast ADD/SUB, MAXIMUM/MINIMUM


@pytest.fixture(scope="module")
def binary_models(builder):
    tf, fq = builder.tf, builder.fq
    models = []
    for r1, r2, ro in [(pow2_range(128, 5), pow2_range(100, 6), pow2_range(140, 5)),
                       ((-4.045, 1.37), (-0.52, 3.9), (-2.77, 4.61))]:
        @tf.function(input_signature=builder.spec([1, 6, 6, 20], [1, 6, 6, 20], [1, 1, 1, 20]))
        def f(a, c, g, r1=r1, r2=r2, ro=ro):
            a, c, g = fq(a, r1), fq(c, r2), fq(g, (0.0, 1.0))
            return {"sub": fq(a - c, ro), "se": fq(a * g, r1), "add_bc": fq(a + g, ro), "sub_bc": fq(g - c, ro),
                    "max": fq(tf.maximum(a, fq(c, r1)), r1), "min": fq(tf.minimum(a, fq(c, r1)), r1)}
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_elementwise(binary_models, backend):
    for model in binary_models:
        check(model, backend, {"SUB", "MUL", "MAXIMUM", "MINIMUM"})


@pytest.fixture(scope="module")
def broadcast_models(builder):
    """Broadcast ADD/SUB/MUL of every shape pattern the optimized kernels split into calls of their own: a
    scalar (an input, or the hard-sigmoid's constant 3) over (1,1,1,C) and (1,H,W,C), a per-pixel scalar
    (1,H,W,1) over channels, and a (1,1,1,C) row over (1,H,W,C). C = 37 is no multiple of 8 or 16: every call has SIMD
    blocks and a scalar tail. The constants are int8 only in a calibrated float graph (a FakeQuant of a
    constant folds to a float constant)."""
    tf, fq = builder.tf, builder.fq
    shapes = [[1, 1, 1, 37], [1, 3, 3, 37], [1, 3, 3, 1], [1, 1, 1, 37]]
    models = []
    # the hard-sigmoid's scales: the second input (0, 3) at half the output scale puts every odd code on a tie
    for r1, r2, ro in [((-2.85, 2.8), (0.0, 3.0), (-3.0, 3.0)), ((-4.045, 1.37), (-0.52, 3.9), (-2.77, 4.61))]:
        @tf.function(input_signature=builder.spec(*shapes, [1, 1, 1, 1]))
        def f(v, a, p, g, k, r1=r1, r2=r2, ro=ro):
            v, a, p, g, k = fq(v, r1), fq(a, r1), fq(p, r2), fq(g, r2), fq(k, r2)
            return {"kv": fq(tf.nn.relu6(v + k), (0.0, 6.0)), "ka": fq(a + k, ro), "ks": fq(k - a, ro),
                    "km": fq(a * k, ro), "pv": fq(p + v, ro), "pa": fq(p + a, ro), "ga": fq(a + g, ro),
                    "gs": fq(g - a, ro), "ps": fq(a - p, ro), "gm": fq(a * g, ro), "pm": fq(p * a, ro),
                    "vg": fq(v + g, ro), "gv": fq(g - v, ro)}  # vg, gv: same shapes, no broadcast
        models.append(builder.convert(f))

    @tf.function(input_signature=builder.spec(*shapes[:2]))
    def consts(v, a):
        three = tf.constant(3.0, shape=[1, 1, 1, 1])
        return {"hsig": tf.nn.relu6(v + three) * (1.0 / 6.0), "v3": v + 3.0, "a3": a + three, "s3": a - three,
                "m3": a * three}
    rng = np.random.default_rng(3)
    samples = [[rng.uniform(-4, 3, s).astype(np.float32) for s in shapes[:2]] for _ in range(4)]
    return models + [builder.convert(consts, representative=samples)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_binary_ops(broadcast_models, backend):
    for model in broadcast_models:
        check(model, backend, {"ADD", "SUB", "MUL"})


# ---------------------------------------------------------------------------------------------
# Layout: ops that only move codes


@pytest.fixture(scope="module")
def layout_model(builder):
    tf, fq = builder.tf, builder.fq
    r = pow2_range(120, 4)

    @tf.function(input_signature=builder.spec([1, 5, 7, 6], [1, 1, 6, 6]))
    def f(x, y):
        x, y = fq(x, r), fq(y, r)
        s1, s2 = tf.split(x, 2, axis=-1)
        v1, v2 = tf.split(x, [2, -1], axis=2)
        e = tf.expand_dims(tf.squeeze(y, 1), 2)
        return {"t": fq(tf.transpose(x, [0, 3, 1, 2]), r), "ss": fq(x[:, 1:5:2, ::3, 1:], r),
                "sl": fq(tf.slice(x, [0, 1, 2, 0], [1, 3, -1, 4]), r), "s1": fq(s1, r), "s2": fq(s2 + 0.0, r),
                "v1": fq(v1, r), "v2": fq(v2, r), "g": fq(tf.gather(x, [4, 0, 2, 2], axis=2), r),
                "e": fq(e, r), "p": fq(tf.pad(x, [[0, 0], [1, 0], [2, 1], [0, 0]], constant_values=0.75), r)}
    return builder.convert(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_ops(layout_model, backend):
    check(layout_model, backend, {"TRANSPOSE", "SLICE", "STRIDED_SLICE", "SPLIT", "SPLIT_V", "GATHER", "PADV2"})


def test_multi_output_ops_without_intermediates(layout_model):
    """SPLIT/SPLIT_V write several tensors; a plain run (tensors freed as soon as read) gives the same outputs."""
    import torch

    import xqat

    xs = [torch.as_tensor(x) for x in sample_codes(layout_model, np.random.default_rng(4), 20)]
    outs = xqat.emulate(layout_model, xs, backend="builtin")
    _, every = xqat.emulate(layout_model, xs, backend="builtin", intermediates=True)
    m = read_tflite(layout_model)
    assert len(outs) == len(m.outputs) >= 10
    assert all(torch.equal(o, every[t]) for o, t in zip(outs, m.outputs))


@pytest.fixture(scope="module")
def rearrange_model(builder):
    """Pixel shuffles, tiling, stacking, and the reductions that compare codes (segmenter heads: argmax)."""
    tf, fq = builder.tf, builder.fq
    r = pow2_range(100, 5)

    @tf.function(input_signature=builder.spec([1, 4, 6, 8], [1, 4, 6, 8]))
    def f(x, y):
        x, y = fq(x, r), fq(y, r)
        u = tf.unstack(x, axis=2)
        return {"s2d": fq(tf.nn.space_to_depth(x, 2), r),
                "u0": fq(u[0], r), "u5": fq(u[5], r),
                "stack": fq(tf.stack([x, y], axis=3), r),
                "rmax": fq(tf.reduce_max(x, axis=[1, 2], keepdims=True), r), "rmin": fq(tf.reduce_min(x, axis=3), r),
                "amax": tf.argmax(x, axis=3), "amin": tf.argmin(y, axis=1, output_type=tf.int32)}
    return builder.convert(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rearrange_and_code_reductions(rearrange_model, backend):
    check(rearrange_model, backend, {"SPACE_TO_DEPTH", "UNPACK", "PACK", "REDUCE_MAX",
                                     "REDUCE_MIN", "ARG_MAX", "ARG_MIN"})


@pytest.fixture(scope="module")
def not_in_reference_model(builder):
    """DEPTH_TO_SPACE and TILE: their int8 versions exist in the optimized kernels only."""
    tf, fq = builder.tf, builder.fq
    r = pow2_range(100, 5)

    @tf.function(input_signature=builder.spec([1, 4, 6, 8]))
    def f(x):
        x = fq(x, r)
        return {"d2s": fq(tf.nn.depth_to_space(x, 2), r), "tile": fq(tf.tile(x, [1, 2, 1, 3]), r)}
    return builder.convert(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_the_reference_kernels_lack(not_in_reference_model, backend):
    import xqat
    from xqat.errors import EmulationError
    from xqat.verify.emulate import REFERENCE_LACKS

    if backend != "reference":
        check(not_in_reference_model, backend, {"DEPTH_TO_SPACE", "TILE"})
        return
    assert {op.name for op in read_tflite(not_in_reference_model).ops} == set(REFERENCE_LACKS)
    codes = sample_codes(not_in_reference_model, np.random.default_rng(0), 1)
    with pytest.raises(ValueError, match="Didn't find op"):  # the interpreter refuses the model ...
        run_interpreter(not_in_reference_model, "reference", codes)
    with pytest.raises(EmulationError, match="reference kernels have no int8"):  # ... and so does the emulator
        xqat.Emulator(not_in_reference_model, backend="reference")


@pytest.fixture(scope="module")
def resize_nearest_models(builder):
    tf, fq = builder.tf, builder.fq
    r = pow2_range(77, 3)
    models = []
    for size, out in [((4, 5), (8, 10)), ((5, 3), (7, 8)), ((6, 7), (4, 3))]:
        @tf.function(input_signature=builder.spec([1, *size, 3]))
        def f(x, out=out):
            x = fq(x, r)
            v1 = tf.compat.v1.image
            return {"hp": fq(v1.resize_nearest_neighbor(x, out, half_pixel_centers=True), r),
                    "ac": fq(v1.resize_nearest_neighbor(x, out, align_corners=True), r),
                    "plain": fq(v1.resize_nearest_neighbor(x, out), r)}
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_nearest(resize_nearest_models, backend):
    for model in resize_nearest_models:
        check(model, backend, {"RESIZE_NEAREST_NEIGHBOR"})


# ---------------------------------------------------------------------------------------------
# Convolutions the model set lacks: TRANSPOSE_CONV (per-channel, with and without bias), grouped CONV_2D.
# Float graphs calibrated by the converter (its per-channel transposed filters need no fake-quant axis).


def _calibration(rng, *shapes, n: int = 24) -> list[list[np.ndarray]]:
    return [[(rng.normal(size=s) * 2).astype(np.float32) for s in shapes] for _ in range(n)]


@pytest.fixture(scope="module")
def conv_models(builder):
    tf, rng = builder.tf, np.random.default_rng(21)
    w8 = (rng.normal(size=(3, 3, 8, 6)) * 0.3).astype(np.float32)  # (kh, kw, out, in)
    w13 = (rng.normal(size=(2, 2, 13, 6)) * 0.3).astype(np.float32)
    b13 = rng.normal(size=13).astype(np.float32)
    wg = (rng.normal(size=(3, 3, 3, 12)) * 0.3).astype(np.float32)  # 4 groups of 3 input channels

    @tf.function(input_signature=builder.spec([1, 5, 4, 6]))
    def tconv(x):
        return {"same": tf.nn.conv2d_transpose(x, w8, [1, 10, 8, 8], 2, "SAME"),
                "valid_bias": tf.nn.conv2d_transpose(x, w13, [1, 10, 8, 13], 2, "VALID") + b13,
                "s3": tf.nn.relu(tf.nn.conv2d_transpose(x, w8, [1, 15, 12, 8], 3, "SAME"))}

    wd = (rng.normal(size=(3, 3, 12, 5)) * 0.3).astype(np.float32)
    dw = (rng.normal(size=(3, 3, 12, 1)) * 0.3).astype(np.float32)

    @tf.function(input_signature=builder.spec([1, 6, 6, 12]))
    def grouped(x):  # with the dilated (atrous) convolutions of segmentation heads
        return {"g": tf.nn.conv2d(x, wg, 1, "SAME"), "g2": tf.nn.conv2d(x, wg, 2, "VALID") + 0.5,
                "dil": tf.nn.conv2d(x, wd, 1, "SAME", dilations=2),
                "dwdil": tf.nn.depthwise_conv2d(x, dw, [1, 1, 1, 1], "SAME", dilations=[2, 2])}

    return [builder.convert(tconv, representative=_calibration(rng, (1, 5, 4, 6))),
            builder.convert(grouped, representative=_calibration(rng, (1, 6, 6, 12)))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_transpose_conv_and_grouped_conv(conv_models, backend):
    tconv, grouped = conv_models
    check(tconv, backend, {"TRANSPOSE_CONV"})
    m = read_tflite(grouped)
    assert any(m.tensor(op.inputs[1]).shape[3] < m.tensor(op.inputs[0]).shape[3] for op in m.ops
               if op.name == "CONV_2D")  # grouped
    check(grouped, backend, {"CONV_2D", "DEPTHWISE_CONV_2D"})
    dilations = {(op.options.get("dilationHFactor"), op.options.get("dilationWFactor")) for op in m.ops}
    assert (2, 2) in dilations


@pytest.fixture(scope="module")
def resize_bilinear_models(builder):
    """Up- and down-sampling, integer and fractional ratios, the three coordinate conventions."""
    tf, rng = builder.tf, np.random.default_rng(22)
    models = []
    for size, out in [((4, 5), (8, 10)), ((5, 3), (7, 8)), ((6, 7), (4, 3)), ((3, 3), (1, 5))]:
        @tf.function(input_signature=builder.spec([1, *size, 3]))
        def f(x, out=out):
            v1 = tf.compat.v1.image
            return {"hp": v1.resize_bilinear(x, out, half_pixel_centers=True),
                    "ac": v1.resize_bilinear(x, out, align_corners=True), "plain": v1.resize_bilinear(x, out)}
        models.append(builder.convert(f, representative=_calibration(rng, (1, *size, 3))))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_bilinear(resize_bilinear_models, backend):
    for model in resize_bilinear_models:
        check(model, backend, {"RESIZE_BILINEAR"})


def _op_differences(model: bytes, a: str, b: str) -> dict[str, int]:
    """Elements where the emulator's backends a and b disagree, per op name (every op output, every sample)."""
    import torch

    import xqat

    m = read_tflite(model)
    xs = [torch.as_tensor(x) for x in sample_codes(model, np.random.default_rng(3))]
    _, ta = xqat.emulate(model, xs, backend=a, intermediates=True)
    _, tb = xqat.emulate(model, xs, backend=b, intermediates=True)
    out: dict[str, int] = {}
    for op in m.ops:
        for t in op.outputs:
            out[op.name] = out.get(op.name, 0) + int((ta[t] != tb[t]).sum())
    return out


def test_the_backend_rules_are_exercised(activation_models, binary_models, conv_models, resize_bilinear_models,
                                        batch_matmul_models):
    """The inputs above reach the cases where the backends' roundings differ, so the per-backend rules were
    each checked (ops whose backends share one formula, e.g. HARD_SWISH, RELU, are not listed)."""
    pairs = {("LEAKY_RELU", "reference", "xnnpack"): activation_models,
             ("SUB", "reference", "xnnpack"): binary_models, ("MUL", "builtin", "xnnpack"): binary_models,
             ("TRANSPOSE_CONV", "reference", "builtin"): conv_models[:1],
             ("TRANSPOSE_CONV", "builtin", "xnnpack"): conv_models[:1],
             ("RESIZE_BILINEAR", "reference", "xnnpack"): resize_bilinear_models,
             ("BATCH_MATMUL", "reference", "xnnpack"): batch_matmul_models}
    diff = {key: sum(_op_differences(model, key[1], key[2]).get(key[0], 0) for model in models)
            for key, models in pairs.items()}
    assert all(n > 0 for n in diff.values()), diff


# ---------------------------------------------------------------------------------------------
# Sequence models: BATCH_MATMUL of two activations (attention scores, attention x values)


@pytest.fixture(scope="module")
def batch_matmul_models(builder):
    """Both transpose flags; XNNPACK takes the products whose second operand has zero point 0 (a, e)."""
    tf, fq = builder.tf, builder.fq
    models = []
    for ra, rb, ro in [(pow2_range(128, 4), pow2_range(100, 5), pow2_range(128, 1)),
                       ((-4.0, 4.0), (-2.0, 3.0), (-20.0, 20.0))]:
        @tf.function(input_signature=builder.spec([1, 3, 6, 8], [1, 3, 8, 5], [1, 3, 5, 8], [1, 3, 8, 4]))
        def f(a, c, d, e, ra=ra, rb=rb, ro=ro):
            a, c, d, e = fq(a, ra), fq(c, rb), fq(d, rb), fq(e, ra)
            ca = fq(tf.matmul(c, a, transpose_a=True, transpose_b=True), ro)
            return {"ab": fq(tf.matmul(a, c), ro), "adj": fq(tf.matmul(a, d, transpose_b=True), ro),
                    "relu": fq(tf.nn.relu(ca), (0.0, ro[1])), "ae": fq(tf.matmul(a, e), ro),
                    "da": fq(tf.matmul(d, a, transpose_b=True), ro)}
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_matmul(batch_matmul_models, backend):
    for model in batch_matmul_models:
        check(model, backend, {"BATCH_MATMUL"})


# ---------------------------------------------------------------------------------------------
# LayerNorm as xqat decomposes it: MEAN over the last axis, SUB, MUL (square), MEAN, RSQRT, MUL, and the
# converter-quantized constants gamma (MUL) and beta (ADD); RSQRT alone over wide and narrow input ranges


@pytest.fixture(scope="module")
def layer_norm_models(builder):
    tf, fq = builder.tf, builder.fq
    rng = np.random.default_rng(7)
    gamma, beta = (rng.normal(1.0, 0.3, 24).astype(np.float32), rng.normal(0.0, 0.2, 24).astype(np.float32))
    models = []
    for rx, rv, rr in [(pow2_range(128, 3), pow2_range(0, 4), (0.0, 4.0)),
                       ((-2.9, 3.4), (0.0, 1.7), (0.0, 13.0)), ((-0.31, 0.2), (0.0, 0.011), (0.0, 60.0))]:
        @tf.function(input_signature=builder.spec([1, 5, 24], [1, 6, 7]))
        def f(x, v, rx=rx, rv=rv, rr=rr):
            x = fq(x, rx)
            d = fq(x - fq(tf.reduce_mean(x, axis=-1, keepdims=True), rx), rx)
            var = fq(tf.reduce_mean(fq(d * d, (0.0, rx[1] ** 2)), axis=-1, keepdims=True), rv)
            y = fq(d * fq(tf.math.rsqrt(var), rr), (-4.0, 4.0))
            return {"ln": fq(fq(y * gamma, (-5.0, 5.0)) + beta, (-5.2, 5.1)),
                    "rsqrt": fq(tf.math.rsqrt(fq(v, rv)), rr)}
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_ops(layer_norm_models, backend):
    for model in layer_norm_models:
        check(model, backend, {"MEAN", "SUB", "MUL", "RSQRT", "ADD"})


def test_every_emulated_op_is_checked_on_every_backend(activation_models, binary_models, layout_model,
                                                       rearrange_model, not_in_reference_model,
                                                       resize_nearest_models, conv_models,
                                                       resize_bilinear_models, batch_matmul_models, layer_norm_models):
    """No op in the emulator's registry without a model above (or in the model set of test_emulate_kernels.py) that
    compares it with the interpreter on all three backends."""
    models = [*activation_models, *binary_models, layout_model, rearrange_model, not_in_reference_model,
              *resize_nearest_models, *conv_models,
              *resize_bilinear_models, *batch_matmul_models, *layer_norm_models]
    checked = set(MODEL_SET_OPS) | {op.name for m in models for op in read_tflite(m).ops}
    assert set(SUPPORTED_OPS) <= checked, sorted(set(SUPPORTED_OPS) - checked)
