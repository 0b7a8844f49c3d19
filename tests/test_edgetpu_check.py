"""EdgeTPU readiness checker: every rule fires on a model that breaks it, built at test time with the real
TFLite converter, and a clean int8 CNN (FakeQuant graph, the `xqat export` route) passes with no findings.

A few violations the TF 2.21 converter cannot produce (a 2-D schema, a shuffled FC weight format, an int32
overflow of a fused RELU6 bound...) are made by editing one field of a converted model's flatbuffer.
"""

from __future__ import annotations

import json
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

import xqat
from tests.tflite_oracle import tf_to_tflite
from xqat.cli import main
from xqat.edgetpu.check import check_edgetpu, op_macs
from xqat.edgetpu.compiled import compare_with_compiled
from xqat.edgetpu.layers import edgetpu_layer_problems
from xqat.edgetpu.rules import RUNTIME_VERSIONS, SUPPORTED_OPS
from xqat.errors import TFLiteFileError
from xqat.tflite.model import read_tflite

CORAL = Path(__file__).parent / "data" / "coral"

pytestmark = pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning")

# ------------------------------------------------------------------------------------------ model builders


def _patch(raw: bytes, edit) -> bytes:
    """Unpack a .tflite, let `edit(model_t)` change it, pack it again with the TFL3 identifier."""
    m = schema.ModelT.InitFromPackedBuf(raw, 0)
    edit(m)
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _tile_v1(m) -> None:
    """TILE as a uint8 TF1-era converter wrote it (version 1, which compiler 16 knows); int8 TILE is v3."""
    for c in m.operatorCodes:
        if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.TILE:
            c.version = 1


class _Models:
    """Builds each test model on first use; shared by the whole module."""

    def __init__(self, tf):
        self.tf = tf
        self.cache: dict[str, bytes] = {}
        self.rng = np.random.default_rng(0)

    def w(self, *shape):
        return self.tf.constant(self.rng.standard_normal(shape).astype(np.float32) * 0.3)

    def __getitem__(self, name: str) -> bytes:
        if name not in self.cache:
            self.cache[name] = getattr(self, f"_{name}")()
        return self.cache[name]

    def fn(self, shape, body):
        return self.tf.function(body, input_signature=[self.tf.TensorSpec(shape, self.tf.float32)])

    # ---- clean: the ops `xqat export` emits for the model set, from a FakeQuant graph
    def _clean(self):
        tf, w = self.tf, self.w
        fq = tf.quantization.fake_quant_with_min_max_args

        def per_tensor(k):
            a = float(np.abs(k.numpy()).max())
            return fq(k, -a, a, narrow_range=True)

        def per_channel(k):
            a = np.abs(k.numpy()).reshape(-1, k.shape[-1]).max(0)
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(k, -a, a, narrow_range=True)

        w1, b1, wd, w3, wf, bf = w(3, 3, 3, 8), w(8), w(3, 3, 8, 1), w(1, 1, 8, 8), w(16, 10), w(10)

        def body(x):
            x = fq(x, -3, 3)
            x = fq(tf.nn.relu(tf.nn.conv2d(x, per_channel(w1), 1, "SAME") + b1), 0, 6)
            x = fq(tf.nn.relu6(tf.nn.depthwise_conv2d(x, per_tensor(wd), [1, 1, 1, 1], "SAME")), 0, 6)
            x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            x = fq(x + fq(tf.nn.conv2d(x, per_channel(w3), 1, "SAME"), -4, 4), -6, 8)
            x = tf.concat([x, x], -1)
            x = tf.compat.v1.image.resize_nearest_neighbor(x, [8, 8])
            x = tf.nn.avg_pool2d(x, 2, 2, "VALID")
            x = fq(tf.reduce_mean(x, [1, 2]), -6, 8)
            x = fq(tf.matmul(x, per_tensor(wf)) + bf, -10, 10)
            return fq(tf.nn.softmax(x), 0, 1)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 3], body))

    def _float_io(self):
        tf, k = self.tf, self.w(3, 3, 4, 4)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 4], lambda x: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))),
                        "ptq", io="float32")

    def _uint8_io(self):
        tf, k = self.tf, self.w(3, 3, 4, 4)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 4], lambda x: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))),
                        "ptq", io="uint8")

    # ---- violations
    def _float(self):
        tf, k = self.tf, self.w(3, 3, 4, 4)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 4], lambda x: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))), "float")

    def _float_leftover(self):
        # Keras-style PReLU relu(x) - a*relu(-x): TF 2.21 leaves the NEG in float inside an int8 model
        tf, alpha = self.tf, self.w(1, 1, 8)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], lambda x: tf.nn.relu(x) - alpha * tf.nn.relu(-x)), "ptq")

    def _grouped(self):
        tf, k = self.tf, self.w(3, 3, 2, 8)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], lambda x: tf.nn.conv2d(x, k, 1, "SAME")), "ptq")

    def _dynamic(self):
        tf, k = self.tf, self.w(3, 3, 8, 4)
        return tf_to_tflite(tf, self.fn([None, 8, 8, 8], lambda x: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME"))), "ptq")

    def _activations(self):
        tf = self.tf

        def body(x):
            x = x * tf.nn.relu6(x + 3.0) / 6.0  # HARD_SWISH
            return tf.nn.gelu(tf.nn.leaky_relu(x, 0.1))
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], body), "ptq")

    def _mac_split(self):
        tf, k1, k2 = self.tf, self.w(3, 3, 8, 8), self.w(1, 1, 8, 8)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], lambda x: tf.nn.conv2d(
            tf.nn.leaky_relu(tf.nn.conv2d(x, k1, 1, "SAME"), 0.1), k2, 1, "SAME")), "ptq")

    def _layout(self):
        tf = self.tf
        ones = tf.constant(np.ones((1, 4, 4, 2), np.float32))

        def body(x):
            p = tf.nn.relu(tf.nn.max_pool2d(x, 2, 2, "VALID"))  # fused RELU on pooling
            q = tf.nn.relu(tf.nn.avg_pool2d(x, 2, 2, "VALID"))
            c = tf.concat([p + q, ones], -1)  # constant, non-zero concat input
            a = tf.compat.v1.image.resize_bilinear(c, [8, 8], half_pixel_centers=True)
            b = tf.compat.v1.image.resize_nearest_neighbor(c, [8, 8], align_corners=True)
            return a + b
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], body), "ptq")

    def _rank5(self):
        tf = self.tf
        return tf_to_tflite(tf, self.fn([1, 4, 4, 8], lambda x: tf.reshape(
            tf.transpose(tf.reshape(x, [1, 2, 2, 4, 8]), [0, 2, 1, 3, 4]), [1, 4, 4, 8])), "ptq")

    def _nchw(self):
        tf, k = self.tf, self.w(3, 3, 3, 8)
        return tf_to_tflite(tf, self.fn([1, 3, 8, 8], lambda x: tf.nn.relu(
            tf.nn.conv2d(tf.transpose(x, [0, 2, 3, 1]), k, 1, "SAME"))), "ptq")

    def _reshape(self):  # relu on (1, 8, 1, 4), reshape to (1, 8, 4): the converter's form of a squeeze
        tf = self.tf
        return tf_to_tflite(tf, self.fn([1, 8, 1, 4], lambda x: tf.reshape(tf.nn.relu(x), [1, 8, 4])), "ptq")

    def _big_softmax(self):
        tf = self.tf
        return tf_to_tflite(tf, self.fn([1, 200, 100], lambda x: tf.nn.softmax(tf.reshape(x, [1, 20000]))), "ptq")

    def _convs(self):
        tf, w = self.tf, self.w
        k1, k2 = w(3, 3, 8, 8), w(3, 3, 8, 2)

        def body(x):
            a = tf.nn.conv2d(x, k1, 1, "SAME", dilations=[1, 2])  # unequal dilation
            return tf.nn.depthwise_conv2d(a, k2, [1, 1, 1, 1], "SAME")  # depth multiplier 2
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], body), "ptq")

    def _tconv_relu(self):
        tf, k, b = self.tf, self.w(3, 3, 4, 16), self.w(4)
        return tf_to_tflite(tf, self.fn([1, 8, 8, 16], lambda x: tf.nn.relu(
            tf.nn.conv2d_transpose(x, k, [1, 16, 16, 4], 2, "SAME") + b)), "ptq")

    def _axes(self):
        tf = self.tf

        def body(x):
            m = tf.reduce_mean(x, -1, keepdims=True)  # channel mean over 6 channels
            y = tf.pad(x * m, [[1, 1], [0, 0], [0, 0], [0, 0]])  # pads the batch dim -> batch 3 output
            parts = tf.split(y, 3, axis=0)  # splits the batch dim
            return y[:, ::2], parts[0] + parts[2]  # strided slice with stride 2
        return tf_to_tflite(tf, self.fn([1, 8, 8, 6], body), "ptq")

    def _fc(self):
        tf, k, b = self.tf, self.w(8, 10), self.w(10)
        return tf_to_tflite(tf, self.fn([1, 4, 8], lambda x: tf.matmul(x, k) + b), "ptq")  # per-channel, 2-D out

    def _prelu_float(self):
        import tf_keras

        inp = tf_keras.Input((8, 8, 4), batch_size=1)
        model = tf_keras.Model(inp, tf_keras.layers.PReLU()(inp))  # alpha (8, 8, 4): unshared
        return tf_to_tflite(self.tf, model, "float")

    def _tiny_scale(self):
        tf = self.tf
        k = self.w(3, 3, 8, 8) * 1e-9  # outputs ~1e-9: a dead layer
        return tf_to_tflite(tf, self.fn([1, 8, 8, 8], lambda x: tf.nn.relu6(tf.nn.conv2d(x, k, 1, "SAME"))), "ptq")

    def _flex(self):
        tf = self.tf
        return tf_to_tflite(tf, self.fn([1, 8], lambda x: tf.math.cumprod(x, 1)), "float", select_tf_ops=True)

    def _while(self):
        tf = self.tf
        return tf_to_tflite(tf, self.fn([1, 8], lambda x: tf.while_loop(
            lambda i, y: i < 3, lambda i, y: (i + 1, y * 2.0), (0, x))[1]), "float")

    def _cast_input(self):  # int32 input: CAST and a float QUANTIZE lead, as in a compiled MoveNet
        tf, k = self.tf, self.w(3, 3, 3, 8)
        fn = tf.function(lambda x: tf.nn.relu(tf.nn.conv2d(tf.cast(x, tf.float32) / 255.0, k, 1, "SAME")),
                         input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.int32)])
        samples = [[self.rng.integers(0, 255, (1, 8, 8, 3)).astype(np.int32)] for _ in range(4)]
        return tf_to_tflite(tf, fn, "ptq", io=None, representative=samples, int8_ops_only=False)

    def _evidence_ops(self):  # ops a compiled pair (or the table) decided
        tf = self.tf

        fq = tf.quantization.fake_quant_with_min_max_args

        def body(x):
            x = fq(x, -4, 4)
            tiled = fq(tf.tile(x, [1, 2, 2, 1]), -4, 4)  # TILE: maps
            pooled = fq(tf.nn.avg_pool2d(x, 4, 4, "VALID"), -4, 4)  # (1, 1, 1, 8)
            from_1x1 = fq(tf.compat.v1.image.resize_bilinear(pooled, [4, 4], align_corners=True), -4, 4)  # CPU
            corners = fq(tf.compat.v1.image.resize_bilinear(x, [8, 8], align_corners=True), -4, 4)  # maps
            padded = fq(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-1.0), -4, 4)  # PADV2: CPU
            return fq(tiled + corners, -8, 8), from_1x1, padded
        return tf_to_tflite(tf, self.fn([1, 4, 4, 8], body))

    def _torch_ops(self):  # the ops xqat's exporter emits for SiLU, chunk, slicing, shuffles, upsampling, ...
        tf, fq = self.tf, self.tf.quantization.fake_quant_with_min_max_args
        kt, bt = self.w(3, 3, 8, 8), self.w(8)

        def body(x):
            x = fq(x, -4, 4)
            s = fq(x * fq(tf.sigmoid(x), 0, 1), -4, 4)  # LOGISTIC, inner QUANTIZE, MUL
            a, b = tf.split(s, 2, axis=-1)  # SPLIT
            c = fq(a[:, 1:3, :, :], -4, 4)  # STRIDED_SLICE
            t = fq(tf.transpose(b, [0, 2, 1, 3]), -4, 4)  # TRANSPOSE
            up = fq(tf.compat.v1.image.resize_nearest_neighbor(t, [8, 8]), -4, 4)
            cat = fq(tf.concat([up, up], -1), -4, 4)
            y = fq(tf.nn.conv2d_transpose(cat, kt, [1, 16, 16, 8], 2, "SAME") + bt, -8, 8)  # TRANSPOSE_CONV v3
            bmm = fq(tf.matmul(tf.reshape(c, [1, 8, 4]), tf.reshape(c, [1, 8, 4]), transpose_b=True), -8, 8)
            return fq(y * tf.nn.relu6(y + 3.0) / 6.0, -4, 8), bmm, c  # HARD_SWISH
        return tf_to_tflite(tf, self.fn([1, 4, 4, 8], body))

    def _deeplab_head(self):  # image pooling broadcast by TILE, concat, small and full-size resizes, argmax
        tf, fq = self.tf, self.tf.quantization.fake_quant_with_min_max_args
        k1, k2, k3 = self.w(3, 3, 3, 8), self.w(1, 1, 8, 8), self.w(1, 1, 16, 4)

        def body(x):
            x = fq(x, -1, 1)
            f = fq(tf.nn.relu(tf.nn.conv2d(x, fq(k1, -1, 1), 2, "SAME")), 0, 6)  # (1, 8, 8, 8)
            p = fq(tf.nn.avg_pool2d(f, 8, 8, "VALID"), 0, 6)  # (1, 1, 1, 8)
            p = fq(tf.nn.relu(tf.nn.conv2d(p, fq(k2, -1, 1), 1, "SAME")), 0, 6)
            c = fq(tf.concat([fq(tf.tile(p, [1, 8, 8, 1]), 0, 6), f], -1), 0, 6)
            y = fq(tf.nn.conv2d(c, fq(k3, -1, 1), 1, "SAME"), -8, 8)
            y = fq(tf.compat.v1.image.resize_bilinear(y, [16, 16], align_corners=True), -8, 8)
            y = fq(tf.compat.v1.image.resize_bilinear(y, [300, 300], align_corners=True), -8, 8)
            return tf.argmax(y, -1)
        return _patch(tf_to_tflite(tf, self.fn([1, 16, 16, 3], body)), _tile_v1)

    def _big(self):
        tf, k = self.tf, self.w(3000, 3000)

        def body(x, v):
            up = tf.compat.v1.image.resize_nearest_neighbor(x, [384, 384])  # 4.5 MiB int8, side > 256
            return up, tf.matmul(v, k)  # 9 MB of int8 weights
        fn = tf.function(body, input_signature=[tf.TensorSpec([1, 192, 192, 32]), tf.TensorSpec([1, 3000])])
        return tf_to_tflite(tf, fn, "ptq", per_tensor_dense=True)


@pytest.fixture(scope="module")
def models(tf):
    return _Models(tf)


def _find(report, code, level=None, op_name=None):
    return [f for f in report.findings if f.code == code and (level is None or f.level == level)
            and (op_name is None or f.op_name == op_name)]


def _op(raw: bytes, name: str) -> int:
    return next(op.index for op in read_tflite(raw).ops if op.name == name)


# ------------------------------------------------------------------------------------------------ clean

def test_clean_int8_cnn_has_no_findings(models):
    r = check_edgetpu(models["clean"])
    assert r.findings == [], r.table()
    assert r.ok and r.fully_mapped
    assert r.first_cpu_op is None and r.mapped_op_share == 1.0 and r.mapped_mac_share == 1.0
    names = set(read_tflite(models["clean"]).op_names())
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MEAN", "SOFTMAX"} <= names
    assert r.total_macs == 8 * 8 * 8 * 27 + 8 * 8 * 8 * 9 + 4 * 4 * 8 * 8 + 10 * 16


def test_io_conversions_float_on_the_cpu_uint8_mapped(models):
    """Float I/O: the QUANTIZE in front and the DEQUANTIZE behind run on the CPU around the TPU segment (CPU O10);
    uint8 I/O: the converting QUANTIZE ops map (WARN O10), the model is fully mapped."""
    r = check_edgetpu(models["float_io"])
    assert r.codes() == {"O10"} and r.ok and not r.fully_mapped, r.table()
    assert {(f.op_name, f.level) for f in r.findings} == {("QUANTIZE", "CPU"), ("DEQUANTIZE", "CPU")}
    assert r.segment_start == 1 and r.cpu_ops == (0, 2) and r.first_cpu_op == 2
    assert "before the TPU segment" in r.findings[0].message and r.mapped_mac_share == 1.0
    r = check_edgetpu(models["uint8_io"])
    assert r.codes() == {"O10"} and r.fully_mapped and r.first_cpu_op is None and r.cpu_ops == ()
    msg = _find(r, "O10")[0].message
    assert "uint8" in msg and "runtime 13" in msg and _find(r, "O10")[0].level == "WARN"


# ------------------------------------------------------------------------------------------ FAIL rules

def test_float_model_fails_t1(models):
    r = check_edgetpu(models["float"])
    assert not r.ok
    t1 = _find(r, "T1", "FAIL")
    assert t1 and t1[0].op_name == "CONV_2D" and "FLOAT32" in t1[0].message and "Model not quantized" in t1[0].message
    assert r.segment_start is None and r.first_cpu_op == 0 and "no op maps" in r.summary()


def test_float_leftover_inside_int8_model_runs_on_the_cpu(models):
    """Float ops in an int8 model are CPU ops, not a failed compile (a compiled MoveNet kept its float ops on
    the CPU); here DEQUANTIZE -> NEG -> QUANTIZE lead the graph, so the TPU segment starts after them."""
    raw = models["float_leftover"]
    r = check_edgetpu(raw)
    assert [op.name for op in read_tflite(raw).ops[:3]] == ["DEQUANTIZE", "NEG", "QUANTIZE"]
    assert r.ok and not r.fully_mapped, r.table()
    assert {(f.op_name, f.code) for f in r.findings} == {("DEQUANTIZE", "O1"), ("NEG", "O1"), ("QUANTIZE", "T1")}
    assert r.segment_start == 3 and r.first_cpu_op is None and r.cpu_ops == (0, 1, 2)
    assert r.mapped_op_share == pytest.approx(4 / 7) and "after 3 leading CPU op(s)" in r.summary()


def test_leading_cast_and_quantize_stay_before_the_segment(models):
    """The compiler's segment need not start at op 0: CAST and the float QUANTIZE run on the CPU first, the
    conv maps, the DEQUANTIZE to the float output runs on the CPU after it."""
    raw = models["cast_input"]
    r = check_edgetpu(raw)
    assert [op.name for op in read_tflite(raw).ops] == ["CAST", "QUANTIZE", "CONV_2D", "DEQUANTIZE"]
    assert r.ok and r.segment_start == 2 and r.first_cpu_op == 3 and r.cpu_ops == (0, 1, 3)
    assert r.mapped_op_share == 0.25 and r.mapped_mac_share == 1.0
    assert "CAST" in _find(r, "O1", "CPU")[0].message and "FLOAT32" in _find(r, "T1", "CPU")[0].message
    assert "after the TPU segment" in r.segment_end_reason and "ends at op 3 DEQUANTIZE" in r.summary()


def test_grouped_conv_fails_on_version_and_layout(models):
    r = check_edgetpu(models["grouped"])
    assert not r.ok
    f5 = _find(r, "F5", "FAIL", "CONV_2D")
    assert f5 and "version 6" in f5[0].message and "TF 2.9" in f5[0].message
    assert "4 groups" in _find(r, "O2", "FAIL")[0].message
    assert "2.9.0" in _find(r, "F6", "WARN")[0].message  # converter's own min_runtime_version
    assert r.first_cpu_op == 0 and r.mapped_mac_share == 0.0


def test_dynamic_batch_fails_t5_only(models):
    r = check_edgetpu(models["dynamic"])
    assert r.codes() == {"T5"}, r.table()
    assert "-1" in r.findings[0].message and r.findings[0].op_index is None


def test_hardswish_leakyrelu_gelu(models):
    raw = models["activations"]
    r = check_edgetpu(raw)
    assert {f.op_name for f in _find(r, "O1", "CPU")} == {"HARD_SWISH", "LEAKY_RELU"}
    f4 = _find(r, "F4", "FAIL", "GELU")
    assert f4 and "150" in f4[0].message
    assert not _find(r, "F5", op_name="GELU")  # one FAIL per cause
    assert r.first_cpu_op == _op(raw, "HARD_SWISH") == 0 and r.segment_start is None  # no op maps


def test_transpose_conv_with_fused_relu(models):
    r = check_edgetpu(models["tconv_relu"])
    assert "version 4" in _find(r, "F5", "FAIL", "TRANSPOSE_CONV")[0].message
    assert "RELU" in _find(r, "O9", "FAIL")[0].message
    assert _find(r, "O1", "WARN", "TRANSPOSE_CONV")  # listed, but known to map poorly


def test_per_channel_fc_and_2d_output(models):
    r = check_edgetpu(models["fc"])
    assert "per channel (10 scales)" in _find(r, "T4", "FAIL", "FULLY_CONNECTED")[0].message
    o3 = _find(r, "O3", "CPU")[0].message
    assert "keep_num_dims" in o3 and "[1, 4, 10]" in o3


def test_batch_axis_rules_and_io_batch(models):
    raw = models["axes"]
    r = check_edgetpu(raw)
    o5 = {f.op_name: f.message for f in _find(r, "O5", "CPU")}
    assert "6 channels" in o5["MEAN"] and "batch" in o5["PAD"] and "splits the batch" in o5["SPLIT"]
    assert "strides [1, 2, 1, 1]" in _find(r, "O7", "CPU", "STRIDED_SLICE")[0].message
    assert "batch > 1" in _find(r, "T5", "FAIL")[0].message
    assert _op(raw, "MEAN") == 0 and r.segment_start == 1 and r.first_cpu_op == _op(raw, "PAD")  # MEAN leads


# ------------------------------------------------------------------------------------------- CPU rules

def test_pool_fused_activation_concat_constant_and_resize_modes(models):
    r = check_edgetpu(models["layout"])
    o4 = _find(r, "O4", "CPU")
    assert {f.op_name for f in o4} == {"AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION"}
    assert any("constant input" in f.message for f in o4)
    o8 = {f.op_name: f.message for f in _find(r, "O8", "CPU")}
    assert "halfPixelCenters" in o8["RESIZE_BILINEAR"] and "alignCorners" in o8["RESIZE_NEAREST_NEIGHBOR"]
    assert r.ok and not r.fully_mapped


def test_rank_above_4(models):
    r = check_edgetpu(models["rank5"])
    assert {f.op_name for f in _find(r, "T7", "CPU")} == {"RESHAPE", "TRANSPOSE"}
    assert "[1, 2, 2, 4, 8]" in _find(r, "T6", "CPU")[0].message
    assert "runtime >= 14" in _find(r, "O1", "WARN", "TRANSPOSE")[0].message
    assert r.first_cpu_op == 0


def test_nchw_transpose_at_the_input_warns(models):
    r = check_edgetpu(models["nchw"])
    assert "NCHW" in _find(r, "T9", "WARN", "TRANSPOSE")[0].message
    assert r.fully_mapped


def test_softmax_too_large(models):
    r = check_edgetpu(models["big_softmax"])
    assert r.codes() == {"O6"}
    assert "20000 elements" in r.findings[0].message
    assert r.first_cpu_op == 1 and r.first_cpu_op_name == "SOFTMAX" and r.mapped_op_share == 0.5
    assert r.mapped_mac_share is None  # no conv/FC at all


def test_dilation_and_depth_multiplier(models):
    r = check_edgetpu(models["convs"])
    assert "1x2" in _find(r, "O2", "CPU", "CONV_2D")[0].message
    assert "multiplier 2" in _find(r, "O2", "WARN", "DEPTHWISE_CONV_2D")[0].message


def test_prelu_alpha_not_shared(models):
    r = check_edgetpu(models["prelu_float"])
    assert "[8, 8, 4]" in _find(r, "O9", "CPU", "PRELU")[0].message


def test_flex_and_control_flow(models):
    r = check_edgetpu(models["flex"])
    f3 = _find(r, "F3", "CPU")
    assert f3 and f3[0].op_name == "CUSTOM:FlexCumprod" and not _find(r, "O1")
    r = check_edgetpu(models["while"])
    assert "3 subgraphs" in _find(r, "F2", "FAIL")[0].message
    assert _find(r, "F2", "CPU", "WHILE")


# ------------------------------------------------------------------------------------------ WARN rules

def test_tiny_scale_warns(models):
    r = check_edgetpu(models["tiny_scale"])
    t8 = _find(r, "T8", "WARN")
    assert t8 and "dead" in t8[0].message and r.ok


def test_large_activation_resize_and_parameters(models):
    r = check_edgetpu(models["big"])
    assert "4.5 MiB" in _find(r, "T9", "WARN", "RESIZE_NEAREST_NEIGHBOR")[0].message
    assert "[1, 384, 384, 32]" in _find(r, "O8", "CPU")[0].message  # past 256 a side: stays on the CPU
    assert "8.6 MiB" in _find(r, "P2", "WARN")[0].message
    assert r.param_bytes >= 9_000_000 and r.ok and not r.fully_mapped


# ------------------------------------------------------------------------- rules from compiled pairs

def test_tile_resize_padv2(models):
    raw = models["evidence_ops"]
    r = check_edgetpu(raw)
    m = read_tflite(raw)
    tile = next(op for op in m.ops if op.name == "TILE")
    assert not _find(r, "O1", op_name="TILE")  # maps (compiled pair), but int8 TILE is version 3, TF 2.8:
    assert tile.version == 3 and "TF 2.8" in _find(r, "F5", "FAIL", "TILE")[0].message
    resizes = {f.op_index: f.message for f in _find(r, "O8", "CPU")}
    assert len(resizes) == 1 and "from a 1x1 map" in next(iter(resizes.values()))
    assert sum(op.name == "RESIZE_BILINEAR" for op in m.ops) == 2  # the align-corners one has no finding
    assert "only PAD" in _find(r, "O1", "CPU", "PADV2")[0].message

    assert not _find(check_edgetpu(_patch(raw, _tile_v1)), "F5", op_name="TILE")


def test_deeplab_head_maps_up_to_the_full_size_resize(models):
    """As the compiler did with a MobileNet-EdgeTPU DeepLab: TILE, CONCATENATION and the small align-corners
    resize map; only the full-size RESIZE_BILINEAR and ARG_MAX stay on the CPU."""
    raw = models["deeplab_head"]
    r = check_edgetpu(raw)
    m = read_tflite(raw)
    assert {"TILE", "CONCATENATION"} <= set(m.op_names()) and r.ok
    assert [m.ops[i].name for i in r.cpu_ops] == ["RESIZE_BILINEAR", "ARG_MAX"], r.table()
    assert "300, 300" in r.segment_end_reason and r.mapped_mac_share == 1.0


def test_ops_of_torch_models(models):
    """The ops xqat's exporter emits for torchvision/timm layers: what maps, what runs on the CPU."""
    raw = models["torch_ops"]
    r = check_edgetpu(raw)
    names = read_tflite(raw).op_names()
    assert names == ["LOGISTIC", "QUANTIZE", "MUL", "SPLIT", "STRIDED_SLICE", "RESHAPE", "BATCH_MATMUL", "TRANSPOSE",
                     "RESIZE_NEAREST_NEIGHBOR", "CONCATENATION", "TRANSPOSE_CONV", "HARD_SWISH"]
    assert r.ok and {(f.op_name, f.level) for f in r.findings} == {
        ("BATCH_MATMUL", "CPU"), ("HARD_SWISH", "CPU"), ("TRANSPOSE", "WARN"), ("TRANSPOSE_CONV", "WARN")}
    assert r.segment_start == 0 and r.first_cpu_op == names.index("BATCH_MATMUL")
    assert "FULLY_CONNECTED" in r.segment_end_reason  # how to make it map
    assert read_tflite(raw).ops[names.index("TRANSPOSE_CONV")].version == 3  # with bias, no fused act: known


def _coral_pairs():
    return sorted((p, p.with_name(p.name.replace("_edgetpu.tflite", ".tflite")))
                  for p in CORAL.glob("*_edgetpu.tflite"))


def test_checker_agrees_with_the_compiler_on_every_compiled_pair():
    """Each pair is a model and what edgetpu_compiler 16 made of it (tests/data/coral/README.md): the checker
    must say it compiles and name the same CPU ops in the same order."""
    pairs = _coral_pairs()
    assert len(pairs) == 4
    for compiled, model in pairs:
        c = compare_with_compiled(model, compiled)
        assert c.agrees, f"{c.name}: predicted {c.predicted_cpu}, compiler {c.actual_cpu}\n{c.report.table()}"
        assert c.predicted_share == pytest.approx(c.actual_share)
    deeplab = compare_with_compiled(CORAL / "deeplabv3_mnv2_dm05_pascal_quant.tflite",
                                    CORAL / "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite")
    assert deeplab.report.first_cpu_op == 64 and "1x1" in deeplab.report.segment_end_reason
    assert deeplab.actual_share == pytest.approx(64 / 72)
    lstm = check_edgetpu(CORAL / "keras_lstm_mnist_ptq.tflite")
    assert lstm.fully_mapped and "UNIDIRECTIONAL_SEQUENCE_LSTM" in read_tflite(lstm.source).op_names()


def test_verdicts_do_not_depend_on_the_file_name(tmp_path):
    src = CORAL / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
    renamed = tmp_path / "model.tflite"
    renamed.write_bytes(src.read_bytes())
    a, b = check_edgetpu(src), check_edgetpu(renamed)
    assert a.findings == b.findings and a.cpu_ops == b.cpu_ops and a.first_cpu_op == b.first_cpu_op


def test_benchmark_prints_agreement(capsys):
    from benchmarks.edgetpu_vs_compiler import main as bench

    assert bench([str(CORAL)]) == 0
    out = capsys.readouterr().out
    assert "agreement: 4 of 4 pairs" in out and "| deeplabv3_mnv2_dm05_pascal_quant | 72 | 88.9% | 88.9% |" in out


# ------------------------------------------------------------------- rules the converter never breaks

def _set_op_field(raw, op_name, edit):
    def apply(m):
        codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
        want = getattr(schema.BuiltinOperator, op_name)
        for op in m.subgraphs[0].operators:
            if codes[op.opcodeIndex] == want:
                edit(m, op)
    return _patch(raw, apply)


def test_patched_violations(models):
    clean = models["clean"]
    tensors = lambda m: m.subgraphs[0].tensors  # noqa: E731

    with pytest.raises(TFLiteFileError, match="schema version 2"):  # the runtime refuses it: invalid
        check_edgetpu(_patch(clean, lambda m: setattr(m, "version", 2)))

    def zero_scale(m, op):
        tensors(m)[op.outputs[0]].quantization.scale = np.array([0.0], np.float32)
    # structurally invalid (the runtime refuses these files): an error, not a verdict
    with pytest.raises(TFLiteFileError, match="scale must be finite and > 0"):
        check_edgetpu(_set_op_field(clean, "MAX_POOL_2D", zero_scale))

    def variable_filter(m, op):
        tensors(m)[op.inputs[1]].buffer = 0
    with pytest.raises(TFLiteFileError, match="before any op writes it"):
        check_edgetpu(_set_op_field(clean, "DEPTHWISE_CONV_2D", variable_filter))

    def wrong_axis(m, op):
        tensors(m)[op.inputs[1]].quantization.quantizedDimension = 3
    with pytest.raises(TFLiteFileError, match="per-axis quantization"):
        check_edgetpu(_set_op_field(clean, "CONV_2D", wrong_axis))

    def overflow(m, op):
        tensors(m)[op.outputs[0]].quantization.scale = np.array([1e-10], np.float32)
    # requantization scale >= 256: the interpreter (XNNPACK) refuses the file, so it is invalid
    with pytest.raises(TFLiteFileError, match="requantization scale"):
        check_edgetpu(_set_op_field(clean, "DEPTHWISE_CONV_2D", overflow))  # fused RELU6

    r = check_edgetpu(_set_op_field(clean, "FULLY_CONNECTED",
                                    lambda m, op: setattr(op.builtinOptions, "weightsFormat", 1)))
    assert "DEFAULT format" in _find(r, "O3", "CPU")[0].message

    def squeeze(dims):  # TF 2.21 always emits RESHAPE for tf.squeeze; turn it into SQUEEZE(dims)
        def edit(m):
            m.operatorCodes.append(schema.OperatorCodeT())
            m.operatorCodes[-1].builtinCode = m.operatorCodes[-1].deprecatedBuiltinCode = schema.BuiltinOperator.SQUEEZE
            op = m.subgraphs[0].operators[-1]
            op.opcodeIndex, op.inputs = len(m.operatorCodes) - 1, op.inputs[:1]
            op.builtinOptionsType = schema.BuiltinOptions.SqueezeOptions
            op.builtinOptions = schema.SqueezeOptionsT()
            op.builtinOptions.squeezeDims = dims
        return edit
    r = check_edgetpu(_patch(models["reshape"], squeeze([2])))
    assert "only leading 1s" in _find(r, "O7", "CPU", "SQUEEZE")[0].message
    assert not check_edgetpu(_patch(models["reshape"], squeeze([0]))).findings

    def add_v4(m):  # ADD v4 first shipped in TF 2.6: uncertain for compiler 16
        for c in m.operatorCodes:
            if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.ADD:
                c.version = 4
    r = check_edgetpu(_patch(clean, add_v4))
    assert "TF 2.6" in _find(r, "F5", "WARN", "ADD")[0].message and r.ok


# ----------------------------------------------------------------------------- partition and the tables

def test_mapped_prefix_counts_macs_before_first_cpu_op(models):
    raw = models["mac_split"]
    r = check_edgetpu(raw)
    assert r.first_cpu_op == _op(raw, "LEAKY_RELU") == 1 and r.first_cpu_op_name == "LEAKY_RELU"
    big, small = 8 * 8 * 8 * (3 * 3 * 8), 8 * 8 * 8 * 8  # 3x3 conv, then 1x1 conv after the CPU op
    assert r.total_macs == big + small
    assert r.mapped_mac_share == pytest.approx(big / (big + small))
    assert r.mapped_op_share == pytest.approx(1 / 3)
    m = read_tflite(raw)
    assert [op_macs(m, op) for op in m.ops] == [big, 0, small]


def test_runtime_table_matches_known_traps():
    """The versions that broke compiler 16 in practice are all past TF 2.5 in the table (docs/edgetpu.md,
    "Compiler and op versions"); TILE v3 (int8) is TF 2.8."""
    assert RUNTIME_VERSIONS["CONV_2D"][5] == (2, 9) and len(RUNTIME_VERSIONS["TRANSPOSE_CONV"]) == 3
    assert RUNTIME_VERSIONS["QUANTIZE"][2] == (2, 7) and RUNTIME_VERSIONS["RESIZE_BILINEAR"][2] == (2, 2)
    assert RUNTIME_VERSIONS["TILE"][2] == (2, 8) and RUNTIME_VERSIONS["GELU"][0] == (2, 9)
    for op in SUPPORTED_OPS:
        assert op in RUNTIME_VERSIONS, op
        assert RUNTIME_VERSIONS[op][0] <= (2, 5)


# ----------------------------------------------------------------------------------- report, API, CLI

def test_report_table_and_json(models):
    r = xqat.check_edgetpu(models["grouped"])
    assert isinstance(r, xqat.EdgeTPUReport)
    text = r.table()
    assert "FAIL" in text and "How to fix:" in text and "onnx2tf -dgc" in text
    d = json.loads(r.to_json())
    assert d["ok"] is False and d["counts"]["FAIL"] == 2 and d["first_cpu_op"] == 0
    assert {"level", "code", "op_index", "op_name", "message", "fix"} == set(d["findings"][0])


def test_cli_exit_codes_and_json(models, tmp_path, capsys):
    """0 fully mapped; 1 FAIL or CPU ops (--allow-cpu: FAIL only); 2 unreadable (next test)."""
    paths = {}
    for name in ("clean", "grouped", "float_io"):
        paths[name] = tmp_path / f"{name}.tflite"
        paths[name].write_bytes(models[name])
    assert main(["check-edgetpu", str(paths["clean"])]) == 0
    assert "FULLY MAPPED" in capsys.readouterr().out
    assert main(["check-edgetpu", str(paths["grouped"]), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and any(f["code"] == "F5" for f in out["findings"])
    assert main(["check-edgetpu", str(paths["grouped"]), "--allow-cpu"]) == 1
    capsys.readouterr()
    assert main(["check-edgetpu", str(paths["float_io"]), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["fully_mapped"] is False and out["cpu_ops"] == [0, 2]
    assert main(["check-edgetpu", str(paths["float_io"]), "--allow-cpu"]) == 0


def test_cli_bad_files_exit_2_without_traceback(tmp_path, capsys):
    assert main(["check-edgetpu", str(tmp_path / "missing.tflite")]) == 2
    err = capsys.readouterr().err
    assert "missing.tflite" in err and "Traceback" not in err
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0\0\0\0TFL3" + b"\xff" * 40)
    assert main(["check-edgetpu", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(TFLiteFileError):
        check_edgetpu(b"not a model")


# ---------------------------------------------------------------------------------------- torch side

def test_torch_layers_that_never_map():
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(8, 8, 3, groups=2)  # fine: prepare_qat splits it per group
            self.grouped_t = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)  # no split: never maps
            self.depthwise = nn.Conv2d(8, 8, 3, groups=8)  # fine
            self.dilated = nn.Conv2d(8, 8, 3, dilation=(1, 2))
            self.acts = nn.Sequential(nn.Hardswish(), nn.GELU(), nn.LeakyReLU(), nn.ReLU6(), nn.SiLU())
            self.up_bilinear = nn.Upsample(scale_factor=2, mode="bilinear")
            self.up_nearest = nn.Upsample(scale_factor=2, mode="nearest")  # fine
            self.conv3d = nn.Conv3d(1, 1, 3)

        def forward(self, x):
            return torch.nn.functional.gelu(self.acts(self.grouped(x)))

    problems = edgetpu_layer_problems(Net())
    by_path = {p.split(" ")[0]: p for p in problems}
    assert set(by_path) == {"grouped_t", "dilated", "acts.1", "acts.2", "up_bilinear", "conv3d"}  # Hardswish: ok
    assert "groups=2" in by_path["grouped_t"] and "fix:" in by_path["grouped_t"]
    assert "half-pixel" in by_path["up_bilinear"]
    assert "GELU" in by_path["acts.1"]

    traced = torch.fx.symbolic_trace(Net())
    fx_problems = [p for p in edgetpu_layer_problems(traced) if "call to" in p]
    assert len(fx_problems) == 1 and "gelu" in fx_problems[0]


def test_torch_model_set_is_clean():
    """The shared model set (tests/models.py) has no layer that can never map, eager or fx-traced."""
    import torch

    from tests.models import MODELS, make_model

    for name in MODELS:
        model = make_model(name)
        assert edgetpu_layer_problems(model) == [], name
        assert edgetpu_layer_problems(torch.fx.symbolic_trace(model)) == [], name
