"""Layerwise parity finds a broken layer: export a model, then shrink one layer's range in torch only, and
let `xqat parity --layerwise` name the first layer whose int8 codes diverge.

Run: .venv/bin/python examples/broken_range_parity.py
"""
import subprocess
import sys

import xqat
from xqat.demo.data import digits
from xqat.demo.nets import DigitsCNN
from xqat.demo.training import fit

data = digits(size=16)
qat = xqat.prepare_qat(fit(DigitsCNN(), data.x_train, data.y_train, epochs=4, lr=3e-3), data.x_train[:1])
fit(qat, data.x_train, data.y_train, epochs=1, lr=5e-4)
xqat.export_tflite(qat, data.x_train[:1], "digits_int8.tflite")

broken = "features_1_0"                       # the second conv's output range...
qat.xqat_quantizers[broken].max.mul_(0.4)     # ...now clips at 40% in torch, not in the .tflite
xqat.save_qat(qat, "digits_broken.pt", (1, 1, 16, 16))
with open("digits_model.py", "w") as f:
    f.write("from xqat.demo.nets import DigitsCNN\n\ndef build():\n    return DigitsCNN()\n")
subprocess.run([sys.executable, "-m", "xqat", "parity", "digits_int8.tflite", "--model", "digits_model.py:build",
                "--weights", "digits_broken.pt", "--random", "64", "--layerwise", "--plot", "broken_parity.png"],
               check=True)
print("expected first divergence: features.1.0 (see broken_parity.png)")
