"""The demo behind `make demo` / `xqat demo`."""

from __future__ import annotations

import numpy as np
import torch

from .table import format_table
from .torch_side.fake_quant import fake_quant
from .torch_side.qparams import tflite_qparams


def smoke(seed: int = 0) -> bool:
    """Fake quant vs TF's kernel, and converter qparams vs `tflite_qparams`, on random ranges."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    ranges = [(np.float32(rng.uniform(-4, 0)), np.float32(rng.uniform(0, 4))) for _ in range(16)]
    x = rng.uniform(-5, 5, 100_000).astype(np.float32)
    mismatches = 0
    for mn, mx in ranges:
        ref = tf.quantization.fake_quant_with_min_max_vars(x, mn, mx).numpy()
        got = fake_quant(torch.from_numpy(x), float(mn), float(mx)).numpy()
        mismatches += int((ref.view(np.int32) != got.view(np.int32)).sum())

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def graph(t):
        return {f"r{i:02d}": tf.quantization.fake_quant_with_min_max_vars(t, float(a), float(b), name=f"r{i:02d}")
                for i, (a, b) in enumerate(ranges)}

    conv = tf.lite.TFLiteConverter.from_concrete_functions([graph.get_concrete_function()])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_output_type = tf.int8
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=conv.convert())
    outs = {d["name"].split(";")[0]: d["quantization"] for d in interp.get_output_details()}
    agree = 0
    for i, (mn, mx) in enumerate(ranges):
        q = tflite_qparams(mn, mx)
        s, z = outs[f"r{i:02d}"]
        agree += int(np.float32(s) == q.scale and z == q.zero_point_signed)
    rows = [
        ["fake_quant vs tf.quantization.fake_quant_with_min_max_vars", f"{x.size * len(ranges)} elements",
         f"{mismatches} bitwise mismatches"],
        ["tflite_qparams vs TFLite converter", f"{len(ranges)} ranges", f"{agree}/{len(ranges)} equal"],
    ]
    print(format_table(["check", "size", "result"], rows, title="xqat smoke test"))
    return mismatches == 0 and agree == len(ranges)
