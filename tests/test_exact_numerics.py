"""Exact numerics (QATConfig(numerics=backend), xqat.set_numerics): the QAT model computes the integer model export
produces, bit for bit, against the real interpreter on every tensor; training works with the "tf" path's gradients."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import xqat
from tests.models import INPUT_SHAPE, MODELS, calibrate, make_model
from tests.op_models import OP_MODELS, make_op_model, train_random
from tests.test_sequence_models import MODELS as SEQUENCE_MODELS
from xqat.demo.nets import ResNetSmall
from xqat.errors import NotQATModelError, QATConfigError, UnsupportedLayerError
from xqat.tflite.model import read_tflite
from xqat.torch_side.config import NUMERICS
from xqat.torch_side.prepare import POINTS, point_module, qat_config
from xqat.verify.backends import BACKENDS
from xqat.verify.teacher_forced import run_recording


def _all_identical(report) -> list[tuple[str, float, int]]:
    """The tensors (outputs and layers) whose codes are not all identical."""
    return [(t.name, t.identical, t.max_abs) for t in report.outputs + report.layers if t.identical != 1.0]


def _observe(qat: nn.Module, make_batch, steps: int = 3) -> nn.Module:
    """A few training-mode forwards without gradients (ranges and BN statistics observed), then eval."""
    qat.train()
    with torch.no_grad():
        for _ in range(steps):
            qat(*make_batch())
    return qat.eval()


def _exact_reports(qat: nn.Module, path, xs) -> dict:
    """Backend -> layerwise parity of the model in that backend's exact numerics against the .tflite; the model is
    back in "tf" numerics afterwards (fixtures share it)."""
    reports = {}
    try:
        for backend in BACKENDS:
            xqat.set_numerics(qat, backend)
            reports[backend] = xqat.parity(qat, path, xs, backend=backend, layerwise=True)
    finally:
        xqat.set_numerics(qat, "tf")
    return reports


@pytest.fixture(scope="module")
def parity_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.cat([torch.rand(24, *INPUT_SHAPE[1:], generator=g), torch.randn(8, *INPUT_SHAPE[1:], generator=g)])


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_numerics_match_the_interpreter_on_every_tensor(exported, parity_inputs, name):
    qat, path, _ = exported[name]  # shared, exported without snapping the model: exact numerics use the file's grid
    for backend, report in _exact_reports(qat, path, parity_inputs).items():
        assert len(report.layers) == len(xqat.quant_points(qat))
        assert _all_identical(report) == [], f"{name} on {backend}"


@pytest.fixture(scope="module")
def op_exported(tmp_path_factory):
    """Every op model (tests/op_models.py) exact numerics compute, trained a few steps and exported once:
    name -> (qat, path, shape)."""
    folder, out = tmp_path_factory.mktemp("exact_ops"), {}
    for name in EXACT_OP_MODELS:
        model, shape = make_op_model(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = train_random(xqat.prepare_qat(model, torch.rand(shape)), shape)
            xqat.export_tflite(qat, torch.rand(shape), folder / f"{name}.tflite")
        out[name] = (qat, folder / f"{name}.tflite", shape)
    return out


# Op models with a layer exact numerics refuse (by name, tested below)
NOT_EXACT = {"decoder": "ConvTranspose2d with padding"}
EXACT_OP_MODELS = [name for name in OP_MODELS if name not in NOT_EXACT]


@pytest.mark.parametrize("name", EXACT_OP_MODELS)
def test_exact_numerics_of_every_op_kind_match_the_interpreter(op_exported, name):
    """SE gates (broadcast MUL), SiLU, hard swish / sigmoid (constant ADD and MUL), standalone ReLU, softmax,
    bilinear and nearest resize, Conv1d, grouped convs and channel shuffle, pads, pass-through ops."""
    qat, path, shape = op_exported[name]
    x = torch.rand(16, *shape[1:], generator=torch.Generator().manual_seed(3))
    for backend, report in _exact_reports(qat, path, x).items():
        assert len(report.layers) == len(xqat.quant_points(qat))
        assert _all_identical(report) == [], f"{name} on {backend}"


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
    """A Gram matrix of a conv net's features (BATCH_MATMUL of (N, C, HW) tensors that export holds channels-last):
    no exact form yet, so exact numerics refuse it (a sequence model's matmul is exact)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        f = self.conv(x).flatten(2)
        return self.head(torch.matmul(f, f.transpose(1, 2)).mean(2))


def test_unsupported_layers_are_refused_by_name():
    qat = xqat.prepare_qat(_Unsupported().eval(), torch.randn(INPUT_SHAPE))
    with pytest.raises(UnsupportedLayerError, match="'matmul' \\(matmul\\)"):
        xqat.set_numerics(qat, "xnnpack")
    assert xqat.numerics(qat) == "tf"
    with pytest.raises(UnsupportedLayerError, match="matmul"):
        xqat.prepare_qat(_Unsupported().eval(), torch.randn(INPUT_SHAPE), xqat.QATConfig(numerics="builtin"))
    qat = calibrate(xqat.prepare_qat(_ChannelGain().eval(), torch.randn(INPUT_SHAPE)))
    with pytest.raises(UnsupportedLayerError, match="'mul' \\(mul\\): a parameter operand 'gain' of a 4-D tensor"):
        xqat.set_numerics(qat, "xnnpack")


@pytest.mark.parametrize("name", list(NOT_EXACT))
def test_op_models_exact_numerics_refuse_name_the_layer(name):
    model, shape = make_op_model(name)
    qat = xqat.prepare_qat(model, torch.rand(shape))
    with pytest.raises(UnsupportedLayerError, match=NOT_EXACT[name]):
        xqat.set_numerics(qat, "xnnpack")
    assert xqat.numerics(qat) == "tf"


class _ChannelGain(nn.Module):
    """A per-channel parameter gain on an NCHW map (a constant operand in export's channels-last layout): refused."""

    def __init__(self):
        super().__init__()
        self.conv, self.gain = nn.Conv2d(3, 4, 3), nn.Parameter(torch.rand(4, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.gain


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
    for backend, report in _exact_reports(qat, path, torch.rand(16, *INPUT_SHAPE[1:])).items():
        assert _all_identical(report) == [], backend


def _near_tie_biases(p: np.ndarray) -> np.ndarray:
    """Per channel, a float32 bias b whose b / p (the converter's double bias scale) and b / float32(p) round to
    different int32 codes: on either side of a .5 tie."""
    out = np.zeros(len(p), np.float32)
    for c, pc in enumerate(p):
        pf = float(np.float32(pc))
        for k in range(1000, 200000):
            t = np.float32((k + 0.5) * pc)
            found = False
            for b in (t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(-np.inf))):
                if np.floor(float(b) / pc + 0.5) != np.floor(float(b) / pf + 0.5):
                    out[c], found = b, True
                    break
            if found:
                break
        else:
            raise AssertionError(f"no near-tie bias for channel {c}")
    return out


def test_int32_bias_is_the_converters_at_near_ties(tmp_path):
    """One rule (qparams.bias_codes: the converter's double scales) for the simulated bias, exact numerics and
    the file; dividing by the float32 product instead gives other codes on these biases."""
    from xqat.torch_side.qparams import bias_codes, converter_scale, int32_bias
    from xqat.verify.exact.integer_ops import Grid, _bias_codes

    torch.manual_seed(0)
    qat = xqat.prepare_qat(nn.Sequential(nn.Linear(8, 4)).eval(), torch.rand(1, 8)).train()
    with torch.no_grad():
        for i in range(3):
            qat(torch.rand(16, 8, generator=torch.Generator().manual_seed(i)))
    qat.eval()
    layer = next(m for m in qat.modules() if type(m).__name__ == "QLinear")
    in_q = xqat.quant_points(qat)[0]
    scale, zp = point_module(qat, in_q.key).quantizer.scale_zero_point()
    s_w = layer.weight_quant.scales(layer.linear.weight)
    p = np.broadcast_to((converter_scale(scale, zp) * converter_scale(s_w, 128, 8, True)).numpy(), (4,))
    with torch.no_grad():
        layer.linear.bias.copy_(torch.from_numpy(_near_tie_biases(p)))
    path = tmp_path / "tie.tflite"
    report = xqat.export_tflite(qat, torch.rand(1, 8), path)
    assert report.ok and report.all_qparams_equal, report.problems()
    m = read_tflite(path)
    fc = next(o for o in m.ops if o.name == "FULLY_CONNECTED")
    in_grid = m.tensors[fc.inputs[0]]
    file_codes = m.tensors[fc.inputs[2]].data.astype(np.int64)
    bias = layer.linear.bias.detach()
    ours, _ = bias_codes(bias, converter_scale(scale, zp), converter_scale(s_w, 128, 8, True))
    assert np.array_equal(ours.numpy().astype(np.int64), file_codes)
    f32_rule = np.floor(bias.double().numpy() / p.astype(np.float32).astype(np.float64) + 0.5)
    assert (f32_rule != file_codes).all()  # the float32 product's codes: wrong on every channel
    grid = Grid(float(in_grid.scales[0]), int(in_grid.zero_points[0]), float(converter_scale(scale, zp)))
    assert np.array_equal(_bias_codes(bias, 4, grid, converter_scale(s_w, 128, 8, True).numpy()), file_codes)
    stored = m.tensors[fc.inputs[2]].scales.astype(np.float64)
    assert np.array_equal(int32_bias(bias, scale, zp, s_w).double().numpy(), (file_codes * stored).astype(np.float32))
    xs = torch.rand(32, 8, generator=torch.Generator().manual_seed(9)) * 0.01  # the bias dominates the outputs
    for backend, report in _exact_reports(qat, path, xs).items():
        assert _all_identical(report) == [], backend


class _UpAndTime(nn.Module):
    """Ops beyond the op models: Conv1d -> mean over time -> Linear; ConvTranspose2d (with BN + ReLU, and plain);
    padded max pools after a ReLU (PAD + VALID) and on signed values (SAME)."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv1d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.up, self.up2 = nn.ConvTranspose2d(4, 6, 2, stride=2), nn.ConvTranspose2d(6, 5, 2, stride=2)
        self.bn, self.pool, self.pool_signed = nn.BatchNorm2d(5), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1)

    def forward(self, x, y):
        return self.fc(torch.relu(self.c(x)).mean(2)), self.pool(torch.relu(self.bn(self.up2(self.up(y))))), \
            self.pool_signed(y)


def test_exact_transpose_conv_mean_over_time_and_padded_max_pools(tmp_path):
    torch.manual_seed(0)
    shapes = ((1, 3, 16), (1, 4, 4, 4))
    qat = _observe(xqat.prepare_qat(_UpAndTime().eval(), tuple(torch.rand(s) for s in shapes)),
                   lambda: (torch.rand(8, 3, 16) - 0.3, torch.randn(8, 4, 4, 4)))
    path = tmp_path / "up.tflite"
    xqat.export_tflite(qat, tuple(torch.rand(s) for s in shapes), path)
    assert {"TRANSPOSE_CONV", "MEAN", "MAX_POOL_2D", "PAD"} <= {op.name for op in read_tflite(path).ops}
    xs = (torch.rand(16, 3, 16) - 0.3, torch.randn(16, 4, 4, 4))
    for backend, report in _exact_reports(qat, path, xs).items():
        assert _all_identical(report) == [], backend


def test_exact_linear_on_sequences(tmp_path):
    """Linear on (N, T, D): FULLY_CONNECTED on the rows of each sample (the .tflite's (T, F) tensors)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    qat = _observe(xqat.prepare_qat(net.eval(), torch.rand(1, 10, 6)), lambda: (torch.randn(8, 10, 6),))
    path = tmp_path / "seq.tflite"
    xqat.export_tflite(qat, torch.rand(1, 10, 6), path)
    for backend, report in _exact_reports(qat, path, torch.randn(16, 10, 6)).items():
        assert len(report.layers) == 3 and _all_identical(report) == [], backend


def test_training_with_dropout_in_exact_numerics():
    """Dropout / DropPath drop in training (their points keep the "tf" value: a random mask has no device form)
    and are identities in eval, where the whole model is the integer one."""
    model, shape = make_op_model("pass_through")
    qat = xqat.prepare_qat(model, torch.rand(shape), xqat.QATConfig(numerics="xnnpack"))
    train_random(qat, shape, steps=3)
    x = torch.rand(4, *shape[1:])
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = qat.train()(x), qat(x)
        assert not torch.equal(a, b) and bool(torch.isfinite(a).all())
        assert torch.equal(qat.eval()(x), qat(x))


def test_exact_leaky_relu_left_to_the_converter(tmp_path):
    """QATConfig(skip=...) on a LeakyReLU: the converter's int8 LEAKY_RELU, computed by its kernel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1)).eval()
    with pytest.warns(UserWarning, match="is skipped"):
        qat = xqat.prepare_qat(net, torch.rand(1, 3, 8, 8), xqat.QATConfig(skip=["1"]))
    _observe(qat, lambda: (torch.randn(4, 3, 8, 8),))
    path = tmp_path / "leaky.tflite"
    xqat.export_tflite(qat, torch.rand(1, 3, 8, 8), path)
    assert "LEAKY_RELU" in [op.name for op in read_tflite(path).ops]
    for backend, report in _exact_reports(qat, path, torch.randn(16, 3, 8, 8)).items():
        assert _all_identical(report) == [], backend


def test_in_place_activation_does_not_change_the_recorded_point(tmp_path):
    """torchvision's Hardswish(inplace=True) after a conv overwrites the tensor the conv's point passed on; parity
    records a copy, so the conv's row compares the conv's codes."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(inplace=True), nn.Conv2d(8, 4, 1)).eval()
    qat = calibrate(xqat.prepare_qat(net, torch.randn(INPUT_SHAPE)))
    path = tmp_path / "hs.tflite"
    xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), path)
    xqat.set_numerics(qat, "xnnpack")
    report = xqat.parity(qat, path, torch.rand(8, *INPUT_SHAPE[1:]), layerwise=True)
    assert [t.name for t in report.layers] == ["input:input_1", "0", "1", "2"] and _all_identical(report) == []


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.Module]):
        super().__init__()
        self.rnn, self.fc = kind(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU])
def test_exact_unrolled_recurrent_layers(tmp_path, kind):
    """LSTM / GRU unrolled into gate FULLY_CONNECTEDs, LOGISTIC, TANH, MUL, ADD, SUB: every tensor identical."""
    torch.manual_seed(0)
    qat = _observe(xqat.prepare_qat(_Recurrent(kind).eval(), torch.rand(1, 5, 6)), lambda: (torch.randn(8, 5, 6),))
    path = tmp_path / "rnn.tflite"
    xqat.export_tflite(qat, torch.rand(1, 5, 6), path)
    for backend, report in _exact_reports(qat, path, torch.randn(16, 5, 6)).items():
        assert len(report.layers) > 50 and _all_identical(report) == [], backend


def test_exact_ceil_mode_average_pool_without_partial_windows(tmp_path):
    """timm's ResNet-D downsample: AvgPool2d(2, 2, ceil_mode=True) at an even size is the VALID pool."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                        nn.Conv2d(8, 4, 1)).eval()
    qat = calibrate(xqat.prepare_qat(net, torch.randn(INPUT_SHAPE)))
    path = tmp_path / "pool.tflite"
    xqat.export_tflite(qat, torch.rand(INPUT_SHAPE), path)
    for backend, report in _exact_reports(qat, path, torch.rand(8, *INPUT_SHAPE[1:])).items():
        assert _all_identical(report) == [], backend


@pytest.mark.parametrize("name", ["encoder", "norm_gelu", "mha"])
def test_exact_transformer_layers(tmp_path, name):
    """LayerNorm (MEAN, SUB, MUL, MEAN, RSQRT, MUL, gamma, beta), GELU (erf and tanh), number and parameter operands
    (c - x, x * c, a positional embedding), head split / merge copies, BATCH_MATMUL and SOFTMAX on torch's axes:
    every tensor identical on every backend."""
    factory, shape = SEQUENCE_MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = train_random(xqat.prepare_qat(factory().eval(), torch.rand(shape)), shape, lr=1e-2)
        xqat.export_tflite(qat, torch.rand(shape), tmp_path / "seq.tflite")
    x = torch.rand(16, *shape[1:], generator=torch.Generator().manual_seed(3))
    for backend, report in _exact_reports(qat, tmp_path / "seq.tflite", x).items():
        assert len(report.layers) == len(xqat.quant_points(qat))
        assert _all_identical(report) == [], f"{name} on {backend}"


def test_training_a_transformer_in_exact_numerics_follows_its_parameter_constants(tmp_path):
    """Training steps in exact numerics move LayerNorm's gamma / beta and the positional embedding (constant operands
    on the converter's grid): the kernels are rebuilt from the new values, and every tensor still matches the
    interpreter after a new export."""
    factory, shape = SEQUENCE_MODELS["encoder"]
    torch.manual_seed(0)
    qat = train_random(xqat.prepare_qat(factory().eval(), torch.rand(shape)), shape, lr=1e-2)
    before = {k: v.clone() for k, v in qat.state_dict().items() if k in ("ln1.weight", "ln2.bias", "pos")}
    xqat.set_numerics(qat, "builtin")  # kept through training, export (of a "tf" copy) and parity: kernels cached
    try:
        train_random(qat, shape, steps=2, seed=1, lr=5e-2)
        assert all(not torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xqat.export_tflite(qat, torch.rand(shape), tmp_path / "enc.tflite")
        report = xqat.parity(qat, tmp_path / "enc.tflite", torch.rand(16, *shape[1:]), backend="builtin",
                             layerwise=True)
    finally:
        xqat.set_numerics(qat, "tf")
    assert _all_identical(report) == []
