"""xqat.evaluate: the device's exact accuracy over a data set, batched through the integer emulator."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import xqat
from xqat.demo.data import digits
from xqat.demo.pipeline import _tflite_predict
from xqat.demo.training import fit

BACKENDS = ["xnnpack", "builtin", "reference"]


class TinyDigits(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(1, 6, 3, 2, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(6, 12, 3, 2, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.c2(self.c1(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A small digits classifier: float training, QAT fine-tuning, int8 export (module-scoped)."""
    data = digits(size=16, seed=0)
    torch.manual_seed(0)
    model = fit(TinyDigits(), data.x_train, data.y_train, epochs=4, lr=1e-2)
    qat = fit(xqat.prepare_qat(model, data.x_train[:1]), data.x_train, data.y_train, epochs=1, lr=1e-3, seed=1)
    path = tmp_path_factory.mktemp("evaluate") / "digits.tflite"
    xqat.export_tflite(qat, data.x_train[:1], path)
    return qat, path, data


@pytest.mark.parametrize("backend", BACKENDS)
def test_emulator_accuracy_equals_the_interpreter_run_one_by_one(digits_model, backend):
    qat, path, data = digits_model
    loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=64)
    r = xqat.evaluate(path, loader, backend=backend)
    preds = _tflite_predict(path.read_bytes(), data.x_test, backend)
    interpreter = float((preds == data.y_test.numpy()).mean())
    assert r.count == len(data.x_test) and r.metric == "top1" and backend in r.source
    assert r.value == interpreter, (r, interpreter)  # exactly: every prediction is the interpreter's
    assert r.value > 0.6  # the model learned something: a real accuracy is being compared
    assert list(r.per_output) == ["fc"] and r.per_output["fc"] == r.value


def test_qat_model_evaluates_through_its_eval_forward(digits_model):
    qat, path, data = digits_model
    batches = [(data.x_test[i:i + 100], data.y_test[i:i + 100]) for i in range(0, len(data.x_test), 100)]
    r = xqat.evaluate(qat, batches)
    assert r.count == len(data.x_test) and "QAT model" in r.source
    assert r.value == xqat.demo.training.accuracy(qat, data.x_test, data.y_test)
    device = xqat.evaluate(path, batches)
    assert abs(r.value - device.value) <= 0.03  # simulation vs device: a few borderline samples at most


def test_evaluate_errors_are_clear(digits_model):
    qat, path, data = digits_model
    batches = [(data.x_test[:8], data.y_test[:8])]
    with pytest.raises(xqat.InputError, match="metric must be one of top1"):
        xqat.evaluate(path, batches, metric="mAP")
    with pytest.raises(xqat.InputError, match="backend must be one of"):
        xqat.evaluate(path, batches, backend="gpu")
    with pytest.raises(xqat.InputError, match=r"\(x, y\) batches"):
        xqat.evaluate(path, [data.x_test[:8]])
    with pytest.raises(xqat.InputError, match="yielded no samples"):
        xqat.evaluate(path, [])
    with pytest.raises(xqat.TFLiteFileError, match="nope.tflite"):
        xqat.evaluate(path.parent / "nope.tflite", batches)
    with pytest.raises(xqat.NotQATModelError):
        xqat.evaluate(nn.Conv2d(1, 2, 1), batches)
