"""Exact numerics (QATConfig(numerics=backend), xqat.set_numerics): the QAT model computes the integer model export
produces, bit for bit, against the real interpreter on every tensor; training works with the "tf" path's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import xqat
from tests.models import INPUT_SHAPE, MODELS, calibrate, make_model
from xqat.demo.nets import ResNetSmall
from xqat.errors import NotQATModelError, QATConfigError, UnsupportedLayerError
from xqat.torch_side.config import NUMERICS
from xqat.torch_side.prepare import POINTS, qat_config
from xqat.verify.backends import BACKENDS
from xqat.verify.teacher_forced import run_recording


def _all_identical(report) -> list[tuple[str, float, int]]:
    """The tensors (outputs and layers) whose codes are not all identical."""
    return [(t.name, t.identical, t.max_abs) for t in report.outputs + report.layers if t.identical != 1.0]


@pytest.fixture(scope="module")
def parity_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.rand(24, *INPUT_SHAPE[1:], generator=g), torch.randn(8, *INPUT_SHAPE[1:], generator=g)])


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_numerics_match_the_interpreter_on_every_tensor(exported, parity_inputs, name):
    qat, path, _ = exported[name]  # shared, exported without snapping the model: exact numerics use the file's grid
    try:
        for backend in BACKENDS:
            xqat.set_numerics(qat, backend)
            report = xqat.parity(qat, path, parity_inputs, backend=backend, layerwise=True)
            assert len(report.layers) == len(xqat.quant_points(qat))
            assert _all_identical(report) == [], f"{name} on {backend}"
    finally:
        xqat.set_numerics(qat, "tf")


@pytest.fixture(scope="module")
def deep_resnet(tmp_path_factory):
    """A 6-block residual net (32 px) trained 25 steps in "tf" numerics, exported while in exact numerics."""
    torch.manual_seed(1)
    model = ResNetSmall(num_classes=10, width=8, depth=2).eval()
    qat = xqat.prepare_qat(model, torch.randn(1, 3, 32, 32))
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    qat.train()
    for _ in range(25):
        loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat.eval()
    xqat.set_numerics(qat, "xnnpack")
    path = tmp_path_factory.mktemp("deep") / "resnet.tflite"
    xqat.export_tflite(qat, torch.randn(1, 3, 32, 32), path)  # the export traces the "tf" graph of a copy
    assert xqat.numerics(qat) == "xnnpack"
    return qat, path, torch.randn(32, 3, 32, 32, generator=g)


def test_deep_residual_net_tf_numerics_diverge_exact_do_not(deep_resnet):
    qat, path, xs = deep_resnet
    try:
        xqat.set_numerics(qat, "tf")
        tf_report = xqat.parity(qat, path, xs, backend="xnnpack", layerwise=True)
        assert min(t.identical for t in tf_report.layers) < 0.99  # the float simulation drifts off in depth
        assert tf_report.outputs[0].identical < 1.0
        for backend in BACKENDS:
            xqat.set_numerics(qat, backend)
            assert _all_identical(xqat.parity(qat, path, xs, backend=backend, layerwise=True)) == [], backend
    finally:
        xqat.set_numerics(qat, "xnnpack")


def test_evaluate_exact_model_equals_evaluate_on_the_emulator(deep_resnet):
    qat, path, xs = deep_resnet
    labels = qat(xs).argmax(1)
    labels[::3] = (labels[::3] + 1) % 10  # not every prediction right, so equal accuracies mean something
    loader = [(xs[i:i + 8], labels[i:i + 8]) for i in range(0, len(xs), 8)]
    on_model = xqat.evaluate(qat, loader)
    on_file = xqat.evaluate(path, loader, backend="xnnpack")
    assert "exact xnnpack" in on_model.source
    assert on_model.value == on_file.value == pytest.approx(2 / 3, abs=0.05)


class _Forced(fx.Interpreter):
    """The "tf" graph with each point's value replaced by a given one, keeping the point's own gradient."""

    def __init__(self, gm: fx.GraphModule, values: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.values = values

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        key = str(target)[len(POINTS) + 1:] if str(target).startswith(POINTS + ".") else None
        return self.values[key] + (out - out.detach()) if key in self.values else out


@pytest.mark.parametrize("name", ["mobilenet_v2", "inception"])
def test_exact_gradients_are_the_tf_paths_gradients(name):
    qat = calibrate(xqat.prepare_qat(make_model(name), torch.randn(INPUT_SHAPE))).eval()
    tf_model = copy.deepcopy(qat)
    xqat.set_numerics(qat, "xnnpack")
    x = torch.rand(6, *INPUT_SHAPE[1:])
    weights = torch.randn(6, 10)
    (qat(x) * weights).sum().backward()
    device_values = run_recording(qat, [x], {p.key for p in xqat.quant_points(qat)})
    (_Forced(tf_model, device_values).run(x) * weights).sum().backward()
    grads = {n: p.grad for n, p in qat.named_parameters()}
    tf_grads = dict(tf_model.named_parameters())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    for n, g in grads.items():
        assert torch.equal(g, tf_grads[n].grad), n


def test_training_with_exact_numerics():
    torch.manual_seed(0)
    qat = xqat.prepare_qat(make_model("mobilenet_v2"), torch.randn(INPUT_SHAPE), xqat.QATConfig(numerics="builtin"))
    assert xqat.numerics(qat) == "builtin"
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(16, *INPUT_SHAPE[1:], generator=g), torch.randint(0, 10, (16,), generator=g)
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    qat.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    # BN and ranges frozen: a training forward is the deployed integer model, the same as eval
    xqat.freeze_bn(qat)
    xqat.freeze_ranges(qat)
    with torch.no_grad():
        train_out = qat.train()(x)
        eval_out = qat.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_set_numerics_round_trip_keeps_state_and_graph(tmp_path):
    qat = calibrate(xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE)))
    state = {k: v.clone() for k, v in qat.state_dict().items()}
    code = qat.code
    x = torch.rand(4, *INPUT_SHAPE[1:])
    tf_out = qat(x)
    assert xqat.numerics(qat) == "tf"
    xqat.set_numerics(qat, "reference")
    assert xqat.numerics(qat) == "reference" and qat_config(qat).numerics == "reference"
    after = qat.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    qat.load_state_dict(state, strict=True)
    exact_out = qat(x)
    assert not torch.equal(exact_out, tf_out)
    assert xqat.numerics(copy.deepcopy(qat)) == "reference"
    assert torch.equal(copy.deepcopy(qat)(x), exact_out)
    xqat.save_qat(qat, tmp_path / "q.pt", input_shape=INPUT_SHAPE)
    loaded, _ = xqat.load_qat("tests.models:plain", tmp_path / "q.pt")
    assert xqat.numerics(loaded) == "reference" and torch.equal(loaded(x), exact_out)
    xqat.set_numerics(qat, "tf")
    assert qat.code == code and xqat.numerics(qat) == "tf" and qat_config(qat).numerics == "tf"
    assert torch.equal(qat(x), tf_out)


def test_bad_numerics_names_and_models():
    assert set(NUMERICS) == {"tf", *BACKENDS}
    qat = xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE))
    for bad in ("tflite", "XNNPACK", None):
        with pytest.raises(QATConfigError, match="'tf', 'xnnpack', 'builtin', 'reference'"):
            xqat.set_numerics(qat, bad)
    with pytest.raises(QATConfigError, match="numerics must be one of"):
        xqat.QATConfig(numerics="int8")
    with pytest.raises(NotQATModelError):
        xqat.set_numerics(make_model("plain"), "xnnpack")


class _Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hswish = nn.Hardswish()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.hswish(self.conv(x)))


def test_unsupported_layers_are_refused_by_name():
    qat = xqat.prepare_qat(_Unsupported().eval(), torch.randn(INPUT_SHAPE))
    with pytest.raises(UnsupportedLayerError, match="'hswish' \\(Hardswish\\)"):
        xqat.set_numerics(qat, "xnnpack")
    assert xqat.numerics(qat) == "tf"
    with pytest.raises(UnsupportedLayerError, match="hswish"):
        xqat.prepare_qat(_Unsupported().eval(), torch.randn(INPUT_SHAPE), xqat.QATConfig(numerics="builtin"))


class _FoldedHead(nn.Module):
    """A ResNet-style head at a 1x1 map: the global pool folds away and the flatten has no point of its own."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 16, 4, 4, 0), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv2(self.conv1(x))), 1))


def test_inputs_read_through_folded_pool_and_flatten(tmp_path):
    qat = calibrate(xqat.prepare_qat(_FoldedHead().eval(), torch.randn(INPUT_SHAPE)))
    assert [p.label for p in xqat.quant_points(qat)] == ["input:x", "conv1.0", "conv2.0", "fc"]
    xqat.set_numerics(qat, "builtin")
    path = tmp_path / "head.tflite"
    xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), path)
    xs = torch.rand(16, *INPUT_SHAPE[1:])
    for backend in BACKENDS:
        xqat.set_numerics(qat, backend)
        assert _all_identical(xqat.parity(qat, path, xs, backend=backend, layerwise=True)) == [], backend
