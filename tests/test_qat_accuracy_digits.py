"""QAT fine-tuning recovers float accuracy on real data shipped in a pip package (sklearn digits)."""

import torch

import xqat
from xqat.demo.data import digits
from xqat.demo.nets import DigitsCNN
from xqat.demo.training import accuracy, fit


def test_qat_recovers_float_accuracy_within_one_point():
    data = digits(size=16)
    torch.manual_seed(0)
    float_model = fit(DigitsCNN(), data.x_train, data.y_train, epochs=8, lr=3e-3)
    float_acc = accuracy(float_model, data.x_test, data.y_test)
    qat = xqat.prepare_qat(float_model, data.x_train[:1])
    fit(qat, data.x_train, data.y_train, epochs=3, lr=5e-4, seed=1)
    qat_acc = accuracy(qat, data.x_test, data.y_test)
    assert float_acc > 0.9, f"float baseline too weak to mean anything: {float_acc:.3f}"
    assert qat_acc >= float_acc - 0.01, f"QAT {qat_acc:.4f} vs float {float_acc:.4f}"
