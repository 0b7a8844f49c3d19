"""xqat.emulate against the real TFLite interpreter on its three backends (docs/numerics.md, per-backend kernel rules).

Models are int8 TFLite files converted at test time from TF fake-quant graphs (no representative
dataset). Ranges with power-of-two scales put many requantizations exactly on ties, where the
backends round differently. Every op output of every sample is compared, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xqat
import xqat.torch_side.qparams
from tests.tflite_oracle import BACKENDS, FakeQuantBuilder, compare_all, mismatches, pow2_range, run_interpreter
from xqat.errors import EmulationError
from xqat.tflite.model import read_tflite
from xqat.verify.emulate import conv, requant, rounding
from xqat.verify.interpreter import quantize_input

# ---------------------------------------------------------------------------------------------
# Model builders (TF fake-quant graphs -> TFLite converter)


def tie_weights(rng, shape, ks) -> np.ndarray:
    """Integer weights times 2^-k with max |w| = 127 * 2^-k per output channel: power-of-two weight scales."""
    w = rng.integers(-127, 128, size=shape).astype(np.float32).reshape(-1, shape[-1])
    w[0] = 127 * rng.choice([-1, 1], size=shape[-1])
    return (w * 2.0 ** -np.asarray(ks, np.float64)).reshape(shape).astype(np.float32)


def digits_cnn(b: FakeQuantBuilder, io="int8") -> bytes:
    """CONV+RELU, DEPTHWISE (M=2, 12 channels, linear, ties), 1x1 CONV+RELU6, AVG_POOL, RESHAPE, FC,
    SOFTMAX."""
    tf, rng = b.tf, np.random.default_rng(1)
    w1 = tie_weights(rng, (3, 3, 1, 6), rng.integers(5, 8, 6))
    b1 = (rng.integers(-400, 400, 6) * 2.0 ** -10).astype(np.float32)
    dw = tie_weights(rng, (3, 3, 1, 12), rng.integers(5, 8, 12))
    w3 = tie_weights(rng, (1, 1, 12, 10), rng.integers(5, 8, 10))
    fc = rng.normal(size=(160, 10)).astype(np.float32) * 0.2

    @tf.function(input_signature=b.spec([1, 8, 8, 1]))
    def f(x):
        x = b.fq(x, (0.0, 16.0))
        y = b.fq(tf.nn.relu(tf.nn.conv2d(x, b.wfq(w1), 1, "SAME") + b1), pow2_range(0, 4))
        y = b.fq(tf.nn.depthwise_conv2d(y, tf.reshape(b.wfq(dw), (3, 3, 6, 2)), [1, 1, 1, 1], "SAME"),
                 pow2_range(100, 3))
        y = b.fq(tf.nn.relu6(tf.nn.conv2d(y, b.wfq(w3), 1, "SAME")), (0.0, 6.0))
        y = b.fq(tf.nn.avg_pool2d(y, 2, 2, "VALID"), (0.0, 6.0))
        logits = b.fq(tf.matmul(tf.reshape(y, [1, 160]), b.wfq(fc, per_channel=False)), (-7.3, 9.1))
        return b.fq(tf.nn.softmax(logits), (0.0, 1.0))

    return b.convert(f, io)


def branchy(b: FakeQuantBuilder, io="int8") -> bytes:
    """CONV, AVG/MAX_POOL (SAME, stride 2), ADD, MUL, CONCATENATION (+requantize), PAD, MEAN, RESHAPE, FC."""
    tf, rng = b.tf, np.random.default_rng(2)
    w1 = tie_weights(rng, (3, 3, 4, 6), rng.integers(6, 9, 6))
    b1 = (rng.integers(-300, 300, 6) * 2.0 ** -11).astype(np.float32)
    fcw = rng.normal(size=(18, 7)).astype(np.float32) * 0.3
    fcb = rng.normal(size=7).astype(np.float32) * 0.1
    rc, rs, rcc = pow2_range(140, 4), pow2_range(70, 3), pow2_range(120, 3)

    @tf.function(input_signature=b.spec([1, 9, 9, 4]))
    def f(x):
        x = b.fq(x, pow2_range(130, 5))
        c = b.fq(tf.nn.conv2d(x, b.wfq(w1), 1, "SAME") + b1, rc)
        a = b.fq(tf.nn.avg_pool2d(c, 3, 2, "SAME"), rc)
        m = tf.nn.max_pool2d(c, 3, 2, "SAME")
        s = b.fq(a + m, rs)
        p = b.fq(s * m, (-2.1, 5.3))
        cc = b.fq(tf.concat([s, p, m], -1), rcc)
        pd = b.fq(tf.pad(cc, [[0, 0], [1, 2], [0, 1], [0, 0]]), rcc)
        mean = b.fq(tf.reduce_mean(pd, [1, 2], keepdims=True), pow2_range(90, 5))
        return b.fq(tf.matmul(tf.reshape(mean, [1, -1]), b.wfq(fcw, per_channel=False)) + fcb, (-3.2, 2.7))

    return b.convert(f, io)


def heads(b: FakeQuantBuilder) -> bytes:
    """FC, FC+RELU, LOGISTIC, TANH, two SOFTMAX (each followed by the converter's requantize)."""
    tf, rng = b.tf, np.random.default_rng(3)
    w1 = rng.normal(size=(16, 12)).astype(np.float32) * 0.5
    b1 = rng.normal(size=12).astype(np.float32) * 0.2
    w2 = rng.normal(size=(12, 10)).astype(np.float32) * 0.5

    @tf.function(input_signature=b.spec([1, 16]))
    def f(x):
        x = b.fq(x, (-2.5, 3.1))
        h = b.fq(tf.matmul(x, b.wfq(w1, False)) + b1, (-6.2, 5.4))
        g = b.fq(tf.nn.relu(tf.matmul(h, b.wfq(w2, False))), (0.0, 4.7))
        return {"sigmoid": b.fq(tf.sigmoid(h), (0.0, 1.0)), "tanh": b.fq(tf.tanh(h), (-1.0, 1.0)),
                "softmax": b.fq(tf.nn.softmax(h), (0.0, 1.0)), "relu": g,
                "softmax2": b.fq(tf.nn.softmax(g), (0.0, 1.0))}

    return b.convert(f)


def input_codes(model: bytes, x: np.ndarray) -> np.ndarray:
    """Float samples -> the model input's integer codes, by the reference kernel's QUANTIZE rule."""
    m = read_tflite(model)
    t = m.tensor(m.inputs[0])
    dtype = np.int8 if t.dtype == "INT8" else np.uint8
    return quantize_input(x, float(t.scales[0]), int(t.zero_points[0]), dtype, "reference")


@pytest.fixture(scope="module")
def model_set(builder):
    """name -> (tflite bytes, [batched inputs]); >= 1000 samples in all, real digits and random codes."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    digits = load_digits().images.astype(np.float32)[:, :, :, None]  # (1797, 8, 8, 1) in [0, 16]
    m_digits, m_digits_u8 = digits_cnn(builder), digits_cnn(builder, io="uint8")
    m_branchy, m_float = branchy(builder), branchy(builder, io=None)
    m_heads = heads(builder)
    return {
        "digits_cnn": (m_digits, [np.concatenate([input_codes(m_digits, digits[:400]),
                                                  rng.integers(-128, 128, (100, 8, 8, 1)).astype(np.int8)])]),
        "digits_cnn_uint8_io": (m_digits_u8, [input_codes(m_digits_u8, digits[400:550])]),
        "branchy": (m_branchy, [rng.integers(-128, 128, (300, 9, 9, 4)).astype(np.int8)]),
        "branchy_float_io": (m_float, [rng.uniform(-4.5, 4.5, (150, 9, 9, 4)).astype(np.float32)]),
        "heads": (m_heads, [rng.integers(-128, 128, (300, 16)).astype(np.int8)]),
    }


# ---------------------------------------------------------------------------------------------
# Whole models: every op output, every sample


# The ops the model set below checks on every backend (the other emulated ops: test_emulate_ops.py)
MODEL_SET_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "MUL", "AVERAGE_POOL_2D",
                           "MAX_POOL_2D", "MEAN", "CONCATENATION", "RESHAPE", "PAD", "QUANTIZE", "DEQUANTIZE",
                           "LOGISTIC", "TANH", "SOFTMAX"})


def test_model_set_covers_the_ops(model_set):
    ops = {op.name for model, _ in model_set.values() for op in read_tflite(model).ops}
    assert ops >= MODEL_SET_OPS
    acts = {op.fused_activation for model, _ in model_set.values() for op in read_tflite(model).ops}
    assert {"RELU", "RELU6"} <= acts
    assert sum(x[0].shape[0] for _, x in model_set.values()) >= 1000


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_set_bit_exact_on_every_tensor(model_set, backend):
    report = {}
    for name, (model, inputs) in model_set.items():
        report[name] = compare_all(model, inputs, backend)
    assert all(bad == 0 for bad, _ in report.values()), report
    assert sum(total for _, total in report.values()) > 200_000


def test_xnnpack_outputs_equal_the_default_interpreter(model_set):
    """preserve_all_tensors splits the XNNPACK delegate per node; the plain default interpreter
    (what users deploy) must give the same outputs, and so must the emulator."""
    emu = {}
    for name, (model, inputs) in model_set.items():
        want = run_interpreter(model, "xnnpack", inputs, preserve=False)
        got = xqat.emulate(model, [torch.as_tensor(x) for x in inputs])  # default backend: xnnpack
        emu[name] = sum(mismatches(g, want[t]) for g, t in zip(got, read_tflite(model).outputs))
    assert emu == {name: 0 for name in model_set}


def test_backends_really_differ_on_the_model_set(model_set):
    """The model set is tie-heavy enough that the three interpreters disagree with each other."""
    model, inputs = model_set["digits_cnn"]
    out = {b: run_interpreter(model, b, inputs) for b in BACKENDS}
    t_dw = [op.outputs[0] for op in read_tflite(model).ops if op.name == "DEPTHWISE_CONV_2D"][0]
    pairs = [("reference", "builtin"), ("reference", "xnnpack"), ("builtin", "xnnpack")]
    assert all(int((out[a][t_dw] != out[b][t_dw]).sum()) > 0 for a, b in pairs)


# ---------------------------------------------------------------------------------------------
# Exhaustive: ADD over all int8 pairs, requantize over all codes, tables over all codes

_ADD_CASES = [
    (pow2_range(128, 5), pow2_range(100, 6), pow2_range(140, 5)),  # power-of-two scales: ties
    (pow2_range(90, 3), pow2_range(200, 5), pow2_range(30, 2)),
    ((-4.045, 1.37), (-0.52, 3.9), (-2.77, 4.61)),
    ((-50.0, 50.0), (-40.0, 40.0), (-0.05, 0.1)),  # ratio >= 256: XNNPACK leaves it; int16 wrap in builtin
]


@pytest.fixture(scope="module")
def add_models(builder):
    tf = builder.tf
    models = []
    for r1, r2, ro in _ADD_CASES:
        @tf.function(input_signature=builder.spec([1, 65536], [1, 65536]))
        def f(a, c, r1=r1, r2=r2, ro=ro):
            return builder.fq(builder.fq(a, r1) + builder.fq(c, r2), ro)
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_all_int8_pairs(add_models, backend):
    codes = np.arange(-128, 128)
    a = np.repeat(codes, 256).astype(np.int8)[None]
    c = np.tile(codes, 256).astype(np.int8)[None]
    for model in add_models:
        m = read_tflite(model)
        assert [op.name for op in m.ops] == ["ADD"]
        inputs = [a if m.tensor(i).name.startswith("a") else c for i in m.inputs]
        want = run_interpreter(model, backend, inputs)[m.outputs[0]]
        got = xqat.emulate(model, inputs, backend=backend)[0]
        assert mismatches(got, want) == 0, (backend, m.source)


@pytest.fixture(scope="module")
def requantize_models(builder):
    """QUANTIZE int8 -> int8 (the converter requantizes a concat input): 270 elements per call, so the
    optimized kernel has a 16-lane body (256 elements) and a 14-element scalar tail."""
    tf, rng = builder.tf, np.random.default_rng(5)
    cases = [(pow2_range(100, 6), pow2_range(128, 4)), (pow2_range(250, 7), pow2_range(3, 4)),  # ratios 1/4,
             (pow2_range(128, 5), pow2_range(37, 4)), (pow2_range(128, 4), pow2_range(100, 6))]  # 1/8: ties
    cases += [((-float(rng.uniform(0.01, 5)), float(rng.uniform(0.01, 5))),
               (-float(rng.uniform(0.01, 5)), float(rng.uniform(0.01, 5)))) for _ in range(4)]
    cases += [((-100.0, 100.0), (-0.3, 0.3))]  # ratio > 128: XNNPACK leaves the node to builtin
    models = []
    for r1, r2 in cases:
        @tf.function(input_signature=builder.spec([1, 270], [1, 1]))
        def f(x, y, r1=r1, r2=r2):
            return builder.fq(tf.concat([builder.fq(x, r1), builder.fq(y, r2)], -1), r2)
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_requantize_all_codes(requantize_models, backend):
    codes = np.arange(-128, 128).astype(np.int8)
    x = np.stack([np.concatenate([np.roll(codes, j), codes[(14 * j + np.arange(14)) % 256]])
                  for j in range(19)])  # body: all codes in every row; tails: all codes over the rows
    for model in requantize_models:
        m = read_tflite(model)
        assert m.ops[0].name == "QUANTIZE" and m.tensor(m.ops[0].inputs[0]).dtype == "INT8"
        inputs = [x if m.tensor(i).shape[1] == 270 else np.zeros((19, 1), np.int8) for i in m.inputs]
        want = run_interpreter(model, backend, inputs)
        _, got = xqat.emulate(model, inputs, backend=backend, intermediates=True)
        bad = [mismatches(got[op.outputs[0]], want[op.outputs[0]]) for op in m.ops]
        assert not any(bad), (backend, m.source, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_quantize_ties_and_dequantize(builder, backend):
    """QUANTIZE float32 -> int8 on inputs exactly at (k + 1/2) * scale, and DEQUANTIZE, with 13 elements
    per call (8-lane SIMD body + scalar tail of the optimized kernels)."""
    tf, rng = builder.tf, np.random.default_rng(6)
    for r in (pow2_range(128, 4), (-1.3, 2.9)):
        @tf.function(input_signature=builder.spec([1, 13]))
        def f(x, r=r):
            return builder.fq(builder.fq(x, r) * 1.0, r)
        model = builder.convert(f, io=None)
        m = read_tflite(model)
        assert [op.name for op in m.ops] == ["QUANTIZE", "DEQUANTIZE"]
        s = np.float32(m.tensor(m.ops[0].outputs[0]).scales[0])
        x = ((rng.integers(-140, 140, (200, 13)) + np.float32(0.5)) * s).astype(np.float32)
        x[::4] = np.nextafter(x[::4], np.float32(np.inf))
        want = run_interpreter(model, backend, [x])
        _, got = xqat.emulate(model, x, backend=backend, intermediates=True)
        assert all(mismatches(got[op.outputs[0]], want[op.outputs[0]]) == 0 for op in m.ops), (backend, r)


# Input grids (scale, int8 zero point) on which the XNNPACK sigmoid table (function in double, lrintf)
# and TFLite's (float32 expf, round half away) differ in one or two entries.
_SIGMOID_GRIDS = [(0.01892166957259178, 60), (0.03434683382511139, -61), (0.05812663212418556, 5),
                  (0.052152086049318314, -74), (0.022350898012518883, 74), (0.07014720141887665, 12)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logistic_tanh_all_codes(builder, backend):
    tf = builder.tf
    codes = np.arange(-128, 128).astype(np.int8)[None]
    grids = [xqat.torch_side.qparams.canonical_range(np.float32(s), zp + 128) for s, zp in _SIGMOID_GRIDS]
    for r in [pow2_range(128, 4), pow2_range(60, 2), (-7.08, 3.77), (-0.93, 11.2)] + grids:
        @tf.function(input_signature=builder.spec([1, 256]))
        def f(x, r=r):
            x = builder.fq(x, r)
            return {"a": builder.fq(tf.sigmoid(x), (0.0, 1.0)), "b": builder.fq(tf.tanh(x), (-1.0, 1.0))}
        model = builder.convert(f)
        m = read_tflite(model)
        want = run_interpreter(model, backend, [codes])
        _, got = xqat.emulate(model, codes, backend=backend, intermediates=True)
        assert {op.name for op in m.ops} == {"LOGISTIC", "TANH", "QUANTIZE"}
        assert all(mismatches(got[op.outputs[0]], want[op.outputs[0]]) == 0 for op in m.ops), (backend, r)


# ---------------------------------------------------------------------------------------------
# MEAN with keepDims over H, W (GlobalAveragePool): the builtin optimized kernel's own path

_MEAN_SIZES = [(2, 2), (4, 4), (8, 8), (3, 5), (7, 7)]
# (input range, output range): equal scales, power-of-two ratios (ties), and an arbitrary ratio
_MEAN_RANGES = [(pow2_range(100, 4), pow2_range(100, 4)), (pow2_range(60, 4), pow2_range(200, 5)),
                (pow2_range(128, 5), pow2_range(30, 3)), (pow2_range(150, 3), pow2_range(128, 6)),
                ((-2.3, 1.7), (-0.71, 1.9))]


@pytest.fixture(scope="module")
def mean_models(builder):
    """One model per spatial size: 21 channels (one 16-channel SIMD block + a 5-channel tail), a MEAN
    keepDims=True over axes 1, 2 per range pair."""
    tf = builder.tf
    models = {}
    for h, w in _MEAN_SIZES:
        @tf.function(input_signature=builder.spec(*[[1, h, w, 21]] * len(_MEAN_RANGES)))
        def f(*xs):
            return {f"m{i}": builder.fq(tf.reduce_mean(builder.fq(x, ri), [1, 2], keepdims=True), ro)
                    for i, (x, (ri, ro)) in enumerate(zip(xs, _MEAN_RANGES))}
        models[(h, w)] = builder.convert(f)
    return models


def _spec_optimized_mean(codes: np.ndarray, si, zi: int, so, zo: int) -> tuple[np.ndarray, np.ndarray]:
    """optimized_integer_ops::Mean in Python integers (independent of xqat): raw sum, float32 bias and
    multiplier; returns (blocks-half-up result, all-gemmlowp result) before the per-channel choice."""
    n = codes.shape[1] * codes.shape[2]
    temp = np.float32(np.float32(zi) * np.float32(si)) / np.float32(so)
    temp = temp + np.float32(0.5) if temp > 0 else temp - np.float32(0.5)
    bias = zo - int(temp)
    m, shift = (int(v[0]) for v in rounding.quantize_multiplier(
        float(np.float32(np.float32(si) / np.float32(np.float32(n) * np.float32(so))))))
    left, right = max(shift, 0), max(-shift, 0)
    sums = codes.astype(np.int64).sum(axis=(1, 2)).ravel()
    up, away = [], []
    for a in sums:
        r = _srdhm_ref(int(a) << left, m)
        up.append((r + ((1 << right) >> 1)) >> right)  # vrshl: half up
        away.append(_rdbp_ref(r, right) if right else r)  # gemmlowp: half away from zero
    shape = (codes.shape[0], 1, 1, codes.shape[3])
    return [np.clip(np.array(v).reshape(shape) + bias, -128, 127) for v in (up, away)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_keepdims_spatial(mean_models, backend):
    """MEAN keepDims=True over H, W on several sizes and scale ratios, every sample equal to the
    interpreter. For builtin, the interpreter also equals the rule written out independently: the
    16-channel SIMD block rounds half up, the remainder channels half away, and the two differ."""
    rng = np.random.default_rng(9)
    block_differs = 0
    for (h, w), model in mean_models.items():
        m = read_tflite(model)
        assert [op.name for op in m.ops] == ["MEAN"] * len(_MEAN_RANGES)
        assert all(op.options["keepDims"] for op in m.ops)
        inputs = [rng.integers(-128, 128, (200, h, w, 21)).astype(np.int8) for _ in m.inputs]
        want = run_interpreter(model, backend, inputs)
        _, got = xqat.emulate(model, inputs, backend=backend, intermediates=True)
        assert all(mismatches(got[op.outputs[0]], want[op.outputs[0]]) == 0 for op in m.ops), (backend, h, w)
        if backend != "builtin":
            continue
        for op in m.ops:
            tin, tout = m.tensor(op.inputs[0]), m.tensor(op.outputs[0])
            x = inputs[m.inputs.index(op.inputs[0])]
            up, away = _spec_optimized_mean(x, tin.scales[0], int(tin.zero_points[0]), tout.scales[0],
                                            int(tout.zero_points[0]))
            assert np.array_equal(want[op.outputs[0]][..., :16], up[..., :16]), (h, w)
            assert np.array_equal(want[op.outputs[0]][..., 16:], away[..., 16:]), (h, w)
            block_differs += int((up[..., :16] != away[..., :16]).sum())
    assert backend != "builtin" or block_differs > 100  # the rule is exercised, not vacuous


def test_mean_keepdims_follows_the_thread_split(mean_models):
    """The optimized MEAN splits its 21 channels over min(21 // 8, threads) threads; each range has its
    own 16-channel SIMD blocks, so the builtin result depends on num_threads, and so does the emulator's."""
    model = mean_models[(4, 4)]
    m = read_tflite(model)
    inputs = [np.random.default_rng(10).integers(-128, 128, (300, 4, 4, 21)).astype(np.int8) for _ in m.inputs]
    one = run_interpreter(model, "builtin", inputs, num_threads=1)
    differ = 0
    for threads in (2, 3):
        want = run_interpreter(model, "builtin", inputs, num_threads=threads)
        _, got = xqat.emulate(model, inputs, backend="builtin", intermediates=True, num_threads=threads)
        assert all(mismatches(got[op.outputs[0]], want[op.outputs[0]]) == 0 for op in m.ops), threads
        differ += sum(int((want[op.outputs[0]] != one[op.outputs[0]]).sum()) for op in m.ops)
    assert differ > 0
    emu = xqat.Emulator(model, backend="builtin", num_threads=2)
    with pytest.raises(EmulationError, match="num_threads=2, not 1"):
        xqat.emulate(emu, inputs, num_threads=1)


# ---------------------------------------------------------------------------------------------
# Paths of the fast kernels that the model set does not reach


@pytest.fixture(scope="module")
def long_reduction_model(builder):
    """1x1 CONV and FC over 2048 input channels with large weights: 128 * sum|w| > 2^24, so the float32
    reduction must be cut into slices summed in float64."""
    tf, rng = builder.tf, np.random.default_rng(11)
    wc = (rng.choice([-1, 1], (1, 1, 2048, 8)) * rng.uniform(0.8, 1, (1, 1, 2048, 8))).astype(np.float32)
    wf = (rng.choice([-1, 1], (2048, 6)) * rng.uniform(0.8, 1, (2048, 6))).astype(np.float32)

    @tf.function(input_signature=builder.spec([1, 3, 3, 2048], [1, 2048]))
    def f(x, v):
        c = builder.fq(tf.nn.conv2d(builder.fq(x, (-0.7, 1.3)), builder.wfq(wc), 1, "VALID"), (-30.0, 34.0))
        d = builder.fq(tf.matmul(builder.fq(v, (-1.1, 0.9)), builder.wfq(wf, per_channel=False)), (-35.0, 41.0))
        return {"c": c, "d": d}

    return builder.convert(f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_reductions_are_sliced_and_exact(long_reduction_model, backend):
    m = read_tflite(long_reduction_model)
    for op in m.ops:
        if op.name in ("CONV_2D", "FULLY_CONNECTED"):
            t_in, t_w = m.tensor(op.inputs[0]), m.tensor(op.inputs[1])
            w = np.abs(t_w.data.reshape(t_w.shape[0], -1).astype(np.float64))
            dtype, slices = conv._chunks(w, np.zeros(len(w)), 128.0, abs(int(t_in.zero_points[0])),
                                            torch.device("cpu"))
            assert dtype == torch.float32 and slices is not None and len(slices) >= 2, op.name
    rng = np.random.default_rng(12)
    inputs = [rng.integers(-128, 128, (60, *m.tensor(i).shape[1:])).astype(np.int8) for i in m.inputs]
    inputs[0][:20] = 127  # accumulators near the bound
    bad, total = compare_all(long_reduction_model, inputs, backend)
    assert bad == 0 and total == 60 * (3 * 3 * 8 + 6)


@pytest.fixture(scope="module")
def pool_models(builder):
    """AVERAGE/MAX_POOL_2D with SAME padding that TFLite splits unevenly (0 before, 1 after) and with
    even padding, on odd and even sizes: counts of in-image taps vary at the borders."""
    tf = builder.tf
    models = []
    for size, k, stride in [(7, 2, 2), (8, 3, 2), (6, 3, 1), (9, 3, 2)]:
        @tf.function(input_signature=builder.spec([1, size, size, 5]))
        def f(x, k=k, stride=stride):
            x = builder.fq(x, pow2_range(77, 3))
            return {"avg": builder.fq(tf.nn.avg_pool2d(x, k, stride, "SAME"), pow2_range(77, 3)),
                    "max": builder.fq(tf.nn.max_pool2d(x, k, stride, "SAME"), pow2_range(77, 3))}
        models.append(builder.convert(f))
    return models


@pytest.mark.parametrize("backend", BACKENDS)
def test_pools_with_uneven_padding(pool_models, backend):
    rng = np.random.default_rng(13)
    for model in pool_models:
        m = read_tflite(model)
        assert {op.name for op in m.ops} == {"AVERAGE_POOL_2D", "MAX_POOL_2D"}
        x = rng.integers(-128, 128, (100, *m.tensor(m.inputs[0]).shape[1:])).astype(np.int8)
        x[:10] = -128  # negative sums: C rounding away from zero
        bad, total = compare_all(model, [x], backend)
        assert bad == 0, (backend, m.tensor(m.inputs[0]).shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_requantization_fallback_is_exact(model_set, backend, monkeypatch):
    """Without the one-floor float64 requantizer the int64 chain runs; both equal the interpreter."""
    monkeypatch.setattr(requant, "one_floor_requantizer", lambda *args, **kwargs: None)
    for name in ("digits_cnn", "branchy"):
        model, inputs = model_set[name]
        bad, _ = compare_all(model, [x[:120] for x in inputs], backend)
        assert bad == 0, (name, backend)


# ---------------------------------------------------------------------------------------------
# The backend choice matters, exactly where the backends' rounding rules say (docs/numerics.md)


@pytest.fixture(scope="module")
def pointwise_tie_model(builder):
    """1x1 CONV_2D with power-of-two scales: the multiplier is exactly 2^-8, so acc * M sits on a tie
    for 1 accumulator in 256 (and next to one, where double rounding shows, for 2 more)."""
    tf, rng = builder.tf, np.random.default_rng(7)
    w = tie_weights(rng, (1, 1, 16, 11), np.full(11, 7))

    @tf.function(input_signature=builder.spec([1, 5, 5, 16]))
    def f(x):
        return builder.fq(tf.nn.conv2d(builder.fq(x, pow2_range(128, 4)), builder.wfq(w), 1, "VALID"),
                          pow2_range(128, 3))

    model = builder.convert(f)
    x = rng.integers(-128, 128, (400, 5, 5, 16)).astype(np.int8)
    return model, x


def _spec_requantize(acc: np.ndarray, backend: str) -> np.ndarray:
    """acc * 2^-8 rounded by each backend's rule, in Python integers (independent of xqat)."""
    m, right = 1 << 30, 7  # QuantizeMultiplier(2^-8) = (2^30, shift -7)
    if backend == "reference":  # gemmlowp: SRDHM then RDBP, both half away from zero
        return np.array([_rdbp_ref(_srdhm_ref(int(a), m), right) for a in acc.ravel()]).reshape(acc.shape)
    if backend == "builtin":  # ruy x86: (a*M + 2^30) >> 31, then (r + 2^(e-1)) >> e, both half up
        return np.array([(((int(a) * m + (1 << 30)) >> 31) + (1 << (right - 1))) >> right
                         for a in acc.ravel()]).reshape(acc.shape)
    return np.rint(acc.astype(np.float32) * np.float32(2.0 ** -8)).astype(np.int64)  # XNNPACK fp32: half even


def test_backends_differ_exactly_where_their_roundings_differ(pointwise_tie_model):
    """REF rounds twice half away from zero, builtin (ruy) twice half up, XNNPACK once half even. The
    emulator of one backend disagrees with the interpreter of another exactly on the elements where
    those rules give different codes (ties and near-ties), and agrees with its own interpreter."""
    model, x = pointwise_tie_model
    m = read_tflite(model)
    op = m.ops[0]
    t_in, t_w, t_out = (m.tensor(i) for i in (op.inputs[0], op.inputs[1], op.outputs[0]))
    assert np.all(np.float64(t_in.scales[0]) * t_w.scales.astype(np.float64) / np.float64(t_out.scales[0])
                  == 2.0 ** -8)
    xq = x.reshape(-1, 16).astype(np.int64) - int(t_in.zero_points[0])
    acc = xq @ t_w.data.reshape(11, 16).T.astype(np.int64)
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        acc = acc + m.tensor(op.inputs[2]).data.astype(np.int64)
    code = {b: np.clip(_spec_requantize(acc, b) + int(t_out.zero_points[0]), -128, 127) for b in BACKENDS}
    frac = (acc % 256) / 256.0
    near_tie = np.abs(frac - 0.5) <= 1 / 256
    assert (frac == 0.5).sum() > 100
    interp = {b: run_interpreter(model, b, [x])[op.outputs[0]].reshape(-1, 11).astype(np.int64)
              for b in BACKENDS}
    emu = {b: xqat.emulate(model, x, backend=b)[0].numpy().reshape(-1, 11).astype(np.int64) for b in BACKENDS}
    for a in BACKENDS:
        assert np.array_equal(emu[a], interp[a])
        assert np.array_equal(emu[a], code[a])  # the documented rule, computed independently
        for b in BACKENDS:
            if a != b:
                differ = emu[a] != interp[b]
                assert differ.sum() > 0, (a, b)
                assert np.array_equal(differ, code[a] != code[b])  # exactly where the rules disagree
                assert not (differ & ~near_tie).any(), (a, b)  # and only at (near) ties
    assert not ((emu["builtin"] != interp["reference"]) & (acc > 0)).any()  # half up = half away for x > 0


# ---------------------------------------------------------------------------------------------
# API behaviour


def test_emulator_is_batch_free_and_reusable(model_set):
    model, inputs = model_set["heads"]
    emu = xqat.Emulator(model, backend="reference")
    x = torch.as_tensor(inputs[0][:64])
    whole = emu.run(x)
    one_by_one = [emu.run(x[i:i + 1]) for i in range(0, 64, 9)]
    for k, out in enumerate(whole):
        assert torch.equal(out[::9], torch.cat([o[k] for o in one_by_one]))
    assert whole[0].dtype == torch.int8 and whole[0].shape[0] == 64
    small = xqat.Emulator(model, backend="reference", samples_per_pass=5)  # 13 passes of <= 5 samples
    outs, env = small.run(x, intermediates=True)
    _, env_whole = emu.run(x, intermediates=True)
    assert all(a.equal(b) for a, b in zip(outs, whole)) and env.keys() == env_whole.keys()
    assert all(env[t].equal(env_whole[t]) for t in env)
    assert xqat.emulate(emu, x)[0].equal(whole[0])
    with pytest.raises(EmulationError, match="built for backend 'reference'"):
        xqat.emulate(emu, x, backend="xnnpack")


def test_bad_inputs_get_clear_errors(model_set):
    model, inputs = model_set["branchy"]
    emu = xqat.Emulator(model)
    with pytest.raises(EmulationError, match="must be torch.int8"):
        emu.run(torch.zeros(2, 9, 9, 4))
    with pytest.raises(EmulationError, match=r"shape \(N, 9, 9, 4\)"):
        emu.run(torch.zeros(2, 9, 9, 3, dtype=torch.int8))
    with pytest.raises(EmulationError, match="1 inputs, got 2"):
        emu.run([inputs[0], inputs[0]])
    with pytest.raises(ValueError, match="backend must be one of"):
        xqat.Emulator(model, backend="gpu")


def test_unsupported_op_is_named(builder):
    tf = builder.tf

    @tf.function(input_signature=builder.spec([1, 8], [1, 8]))
    def f(a, c):
        d = tf.math.squared_difference(builder.fq(a, (-1.0, 1.0)), builder.fq(c, (-1.0, 1.0)))
        return builder.fq(d, (0.0, 4.0))

    model = builder.convert(f)
    op = [o for o in read_tflite(model).ops if o.name == "SQUARED_DIFFERENCE"][0]
    with pytest.raises(EmulationError, match=rf"op #{op.index} SQUARED_DIFFERENCE .* not supported"):
        xqat.Emulator(model)


# ---------------------------------------------------------------------------------------------
# Rounding primitives against their scalar formulas (docs/numerics.md)


def _srdhm_ref(a: int, b: int) -> int:
    if a == b == -(1 << 31):
        return (1 << 31) - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = abs(ab + nudge) // (1 << 31)
    return q if ab + nudge >= 0 else -q


def _rdbp_ref(x: int, e: int) -> int:
    mask = (1 << e) - 1
    return (x >> e) + int((x & mask) > (mask >> 1) + int(x < 0))


def test_rounding_primitives_match_the_spec_formulas():
    rng = np.random.default_rng(8)
    a = rng.integers(-(1 << 31), 1 << 31, 4000)
    b = rng.integers(1 << 30, 1 << 31, 4000)
    a[:64] = np.arange(-32, 32) * (1 << 26)  # exact ties of the 2^31 division
    got = rounding.srdhm(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    assert [int(g) for g in got] == [_srdhm_ref(int(x), int(y)) for x, y in zip(a, b)]
    x = rng.integers(-(1 << 20), 1 << 20, 4000)
    for e in (1, 3, 12, 31):
        got = rounding.rdbp(torch.as_tensor(x), e).numpy()
        assert [int(g) for g in got] == [_rdbp_ref(int(v), e) for v in x]
    mult, shift = rounding.quantize_multiplier([0.5, 0.75, 1.0, 3.0, 2.0 ** -40, 0.0, 0.999999999999])
    assert mult.tolist() == [1 << 30, 3 << 29, 1 << 30, 3 << 29, 0, 0, 1 << 30]
    assert shift.tolist() == [0, 0, 1, 2, 0, 0, 1]


def test_one_floor_requantizer_equals_the_int64_chain():
    """MBQM (gemmlowp or ruy per channel) + zp + clamp as one float64 floor over a clamped window equals
    the two-step integer chain on every sampled accumulator, including window edges and M = 2^30."""
    rng = np.random.default_rng(14)
    checked = 0
    for trial in range(150):
        ch = int(rng.integers(1, 5))
        real = np.exp(rng.uniform(np.log(1e-5), np.log(3.0), ch))
        if trial % 4 == 0:
            real = 2.0 ** rng.integers(-14, 2, ch).astype(np.float64)  # multiplier exactly 2^30
        mult, shift = rounding.quantize_multiplier(real)
        ruy = rng.random(ch) < 0.5
        zp = int(rng.integers(-128, 128))
        lo, hi = (-128, 127) if trial % 3 else sorted(rng.integers(-128, 128, 2).tolist())
        bound = float(rng.choice([300, 5000, 2 ** 20, 2 ** 24]))
        fast = rounding.one_floor_requantizer(mult, shift, ruy, zp, lo, hi, bound)
        if fast is None:
            # only where the window (|acc| <= bound, unsaturated outputs) times M' passes 2^53
            assert any(min(bound, 300 / r) * m * 2 ** max(e, 0) > 2 ** 52 for r, m, e in zip(real, mult, shift))
            continue
        acc = torch.as_tensor(rng.integers(-int(bound), int(bound) + 1, (2000, ch)))
        acc[:64] = torch.as_tensor(rng.integers(-300, 300, (64, ch)))
        acc[64:70] = torch.tensor([[int(bound)], [-int(bound)], [0], [-1], [1], [-2]])
        mt, st = torch.as_tensor(mult), torch.as_tensor(shift)
        want = torch.where(torch.as_tensor(ruy), rounding.mbqm_ruy(acc, mt, st), rounding.mbqm(acc, mt, st))
        want = (want + zp).clamp(lo, hi)
        got = fast(acc.to(torch.float32 if bound <= 2 ** 24 else torch.float64)).to(torch.int64)
        assert torch.equal(got, want), (trial, mult, shift, ruy, zp, lo, hi, bound)
        assert all(rounding.mbqm_int(int(a), int(mult[c]), int(shift[c]), bool(ruy[c])) + zp
                   == min(max(int(w), lo - 1), hi + 1) or int(w) in (lo, hi)
                   for a, w, c in [(acc[i, j], want[i, j], j) for i in range(5) for j in range(ch)])
        checked += 1
    assert checked > 100
    assert rounding.one_floor_requantizer([1 << 30], [40], False, 0, -128, 127, 1000.0) is None  # wraps int32
    assert rounding.one_floor_requantizer([0], [0], False, 0, -128, 127, 1000.0) is None
