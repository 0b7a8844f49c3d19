"""Images/s of xqat.emulate (batched, torch CPU) vs the TFLite interpreter (batch 1, in a loop).

Run: .venv/bin/python -m benchmarks.emulate [--batch 256] [--size 32]
Builds a small int8 CNN (CONV, DEPTHWISE, 1x1 CONV, MEAN, FULLY_CONNECTED, SOFTMAX) with TF fake-quant
and the real converter, checks that emulator and interpreter agree on the timed inputs (each backend),
then prints images/s side by side (emulator with 1 and with all torch threads, interpreter with 1 thread
and XNNPACK also with as many threads) and the ratios emulator / interpreter of the same backend.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xqat  # noqa: E402
from benchmarks._timing import compare, machine  # noqa: E402
from tests.tflite_oracle import interpreter, tf_to_tflite  # noqa: E402


def small_cnn(size: int) -> bytes:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    fq = tf.quantization.fake_quant_with_min_max_vars

    def wfq(w):
        m = np.abs(w).reshape(-1, w.shape[-1]).max(0).astype(np.float32)
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(w, -m, m, narrow_range=True)

    w1 = rng.normal(size=(3, 3, 3, 16)).astype(np.float32) * 0.3
    dw1 = rng.normal(size=(3, 3, 16, 1)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(1, 1, 16, 32)).astype(np.float32) * 0.2
    dw2 = rng.normal(size=(3, 3, 32, 1)).astype(np.float32) * 0.3
    w3 = rng.normal(size=(1, 1, 32, 64)).astype(np.float32) * 0.2
    fc = rng.normal(size=(64, 10)).astype(np.float32) * 0.3

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32)])
    def f(x):
        x = fq(x, -1.0, 1.0)
        x = fq(tf.nn.relu(tf.nn.conv2d(x, wfq(w1), 1, "SAME")), 0.0, 4.0)
        x = fq(tf.nn.relu6(tf.nn.depthwise_conv2d(x, wfq(dw1), [1, 2, 2, 1], "SAME")), 0.0, 6.0)
        x = fq(tf.nn.relu(tf.nn.conv2d(x, wfq(w2), 1, "SAME")), 0.0, 4.0)
        x = fq(tf.nn.relu6(tf.nn.depthwise_conv2d(x, wfq(dw2), [1, 2, 2, 1], "SAME")), 0.0, 6.0)
        x = fq(tf.nn.relu(tf.nn.conv2d(x, wfq(w3), 1, "SAME")), 0.0, 4.0)
        x = fq(tf.reduce_mean(x, [1, 2]), 0.0, 4.0)
        x = fq(tf.matmul(x, fq(tf.constant(fc), -1.0, 1.0, narrow_range=True)), -6.0, 6.0)
        return fq(tf.nn.softmax(x), 0.0, 1.0)

    return tf_to_tflite(tf, f)


def _with_threads(n: int, fn):
    """fn run with n torch threads (restored after): the interpreter rows run 1 or cpu_count threads too."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def main() -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256, help="emulator batch size")
    ap.add_argument("--loop", type=int, default=64, help="images per timed interpreter loop")
    ap.add_argument("--size", type=int, default=32, help="input height = width")
    args, _ = ap.parse_known_args()
    model = small_cnn(args.size)
    x = np.random.default_rng(1).integers(-128, 128, (args.batch, args.size, args.size, 3)).astype(np.int8)
    xt = torch.as_tensor(x)
    emulators = {b: xqat.Emulator(model, backend=b) for b in ("xnnpack", "builtin", "reference")}
    threads = torch.get_num_threads()
    interps = {(name, n): interpreter(model, name, num_threads=n)
               for name, n in (("xnnpack", 1), ("xnnpack", threads), ("builtin", 1), ("reference", 1))}
    first = interps[("xnnpack", 1)]
    inp, out = first.get_input_details()[0], first.get_output_details()[0]

    def loop(it):
        res = []
        for i in range(args.loop):
            it.set_tensor(inp["index"], x[i:i + 1])
            it.invoke()
            res.append(it.get_tensor(out["index"]).copy())
        return np.concatenate(res)

    for (b, _), it in interps.items():  # the timed outputs agree, backend by backend
        got = emulators[b].run(xt)[0].numpy()[:args.loop]
        assert np.array_equal(got, loop(it)), f"emulator and interpreter disagree on the timed model ({b})"

    label = {1: "1 thread", threads: f"{threads} threads"}
    fns = {}
    for b, e in emulators.items():
        for n in sorted({1, threads}):
            fns[f"emulator {b} {label[n]} (batch {args.batch})"] = _with_threads(n, lambda e=e: e.run(xt))
    fns.update({f"interpreter {b} {label[n]} (batch 1 loop)": (lambda it=it: loop(it))
                for (b, n), it in interps.items()})
    t = compare(fns, repeats=5, warmup=1)
    rate = {k: (args.batch if k.startswith("emulator") else args.loop) / v for k, v in t.items()}
    print(f"int8 CNN {args.size}x{args.size}x3, {len(emulators['xnnpack'].model.ops)} ops; CPU ({machine()})")
    for k, r in rate.items():
        print(f"  {k:50s} {r:9.0f} images/s")
    ratios = {}
    for b, n_emu, n_int in (("xnnpack", 1, 1), ("xnnpack", threads, threads), ("builtin", 1, 1),
                            ("builtin", threads, 1), ("reference", 1, 1), ("reference", threads, 1)):
        key = f"emulator {b} {label[n_emu]} / interpreter {label[n_int]}"
        ratios[key] = (rate[f"emulator {b} {label[n_emu]} (batch {args.batch})"]
                       / rate[f"interpreter {b} {label[n_int]} (batch 1 loop)"])
        print(f"  ratio {key:60s} {ratios[key]:6.2f}x")
    return ratios


if __name__ == "__main__":
    main()
