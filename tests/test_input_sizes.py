"""Any input size: at the example's shape, ops the converter folds away (a global pool over a 1x1 map, a no-op
reshape, a pad of 0, a concat of one, an adaptive pool to the same size, a flatten into a Linear) get no point
of their own, so no point lacks a TFLite tensor and no two points on one tensor have different ranges; ops
that stay (a max pool whose stride exceeds the map, a resize to the same size) keep theirs."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xqat
from tests.models import make_model
from xqat.tflite.model import read_tflite
from xqat.torch_side.modules import WeightQuantizedModule
from xqat.verify.interpreter import BACKENDS


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SqueezeHead(nn.Module):
    """torchvision SqueezeNet's classifier on a 1x1 map: Dropout, 1x1 conv, ReLU, AdaptiveAvgPool2d(1), flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_conv(3, 8, 2), nn.MaxPool2d(3, 2, ceil_mode=True))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def _points(model, shape):
    return [(p.label, p.role) for p in xqat.quant_points(xqat.prepare_qat(model.eval(), torch.rand(shape)))]


@pytest.mark.parametrize("pool", ["module", "functional"])
def test_global_pool_over_a_1x1_map_and_flatten_into_linear_get_no_point(pool):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.gap, self.fc = _conv(3, 8, 2), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

        def forward(self, x):
            y = self.c(x)
            y = self.gap(y) if pool == "module" else F.adaptive_avg_pool2d(y, 1)
            return self.fc(torch.flatten(y, 1))

    assert _points(Net(), (1, 3, 2, 2)) == [("input:x", "own"), ("c.0", "own"), ("fc", "own")]
    # on a 2x2 map the pool is a MEAN with its own range, and its RESHAPE stays
    assert [r for _, r in _points(Net(), (1, 3, 4, 4))] == ["own", "own", "own", "pass", "own"]


def test_mean_over_a_1x1_map_stays_a_mean_with_its_own_range():
    """ReduceMean (unlike GlobalAveragePool) stays a MEAN op in the .tflite at 1x1 (seen in MNASNet at 32x32)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = _conv(3, 8, 2), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.c(x).mean((2, 3)))

    assert _points(Net(), (1, 3, 2, 2)) == [("input:x", "own"), ("c.0", "own"), ("mean", "own"), ("fc", "own")]


def test_no_op_reshape_zero_pad_concat_of_one_and_same_size_adaptive_pool_get_no_point():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.same = _conv(3, 8), _conv(8, 8), nn.AdaptiveAvgPool2d((4, 4))

        def forward(self, x):
            y = F.pad(self.c1(x), [0, 0, 0, 0])
            y = torch.cat([y], 1).reshape(y.shape[0], 8, 4, 4)
            return self.c2(self.same(y))

    assert _points(Net(), (1, 3, 4, 4)) == [("input:x", "own"), ("c1.0", "own"), ("c2.0", "own")]


def test_max_pool_with_stride_beyond_the_map_and_same_size_resize_keep_a_point():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.pool = _conv(3, 8, 2), nn.MaxPool2d(1, 4)

        def forward(self, x):
            return F.interpolate(self.pool(self.c(x)), size=(1, 1), mode="nearest")

    assert _points(Net(), (1, 3, 2, 2)) == [("input:x", "own"), ("c.0", "own"), ("pool", "pass"),
                                            ("interpolate", "pass")]


def test_squeezenet_head_on_a_1x1_map_has_one_range_for_conv_and_pool():
    """The cause of SqueezeNet's 32x32 scale mismatch: the pool over the 1x1 map had a range of its own, but
    the converter removes the pool, so the classifier conv's tensor got one of the two scales."""
    pts = _points(SqueezeHead(), (1, 3, 4, 4))
    assert pts == [("input:x", "own"), ("features.0.0", "own"), ("features.1", "pass"), ("classifier.1", "own"),
                   ("flatten", "pass")]


# -- exported at several sizes ---------------------------------------------------------------------------
CASES = {  # name -> (model factory, input shape)
    "squeeze_head_1x1": (SqueezeHead, (1, 3, 4, 4)),
    "mobilenet_v2_1x1": (lambda: make_model("mobilenet_v2"), (1, 3, 2, 2)),
    "pool_head_1x1": (lambda: make_model("pool_head"), (1, 3, 2, 2)),
    "inception_nonsquare": (lambda: make_model("inception"), (1, 3, 12, 20)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("sizes"), {}
    for name, (factory, shape) in CASES.items():
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = xqat.prepare_qat(factory().eval(), torch.rand(shape)).train()
            with torch.no_grad():
                for _ in range(4):
                    qat(torch.rand(8, *shape[1:], generator=g))
            qat.eval()
            try:
                report = xqat.export_tflite(qat, torch.rand(shape), folder / f"{name}.tflite")
            except Exception as e:  # noqa: BLE001 -- reported by the test of that case
                report = e
        out[name] = (qat, folder / f"{name}.tflite", report, shape)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_exports_strictly_with_a_tensor_for_every_point(exported, name):
    qat, path, report, _ = exported[name]
    if isinstance(report, Exception):
        raise report
    assert report.ok and report.all_qparams_equal, report.problems()
    m = read_tflite(path)
    activations = {t.index for t in m.tensors if t.data is None and t.dtype == "INT8"}
    pads = {op.outputs[0] for op in m.ops if op.name in ("PAD", "PADV2")}  # conv / ceil-mode pool padding
    assert set(report.point_tensors.values()) | pads == activations
    assert not [t.name for t in m.tensors if t.dtype == "FLOAT32"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_parity_within_one_lsb_at_every_size(exported, name, backend):
    qat, path, report, shape = exported[name]
    if isinstance(report, Exception):
        raise report
    x = torch.rand(16, *shape[1:], generator=torch.Generator().manual_seed(5))
    r = xqat.parity(qat, path, x, backend=backend)
    assert all(o.max_abs <= 1 for o in r.outputs), r.table()


def test_adaptive_pool_with_unequal_windows_is_gathered_and_pooled_and_a_form_too_large_is_refused_with_a_fix():
    """torchvision VGG at 64 px: AdaptiveAvgPool2d((7, 7)) over a 2x2 map has unequal windows (1 or 2 pixels): GATHER
    along H and W to 14x14, then a 2x2 AVERAGE_POOL_2D, all on the input's grid; windows of 5 and 6 pixels would
    need a 30x30 kernel and are refused with the sizes that work."""
    net = nn.Sequential(_conv(3, 4, 2), nn.AdaptiveAvgPool2d(7))
    assert _points(net, (1, 3, 4, 4))[-3:] == [("1.gather_h", "pass"), ("1.gather_w", "pass"), ("1", "tied")]
    assert _points(net, (1, 3, 2, 2))[-2:] == [("1.gather_h", "pass"), ("1.gather_w", "pass")]  # 1x1: copies only
    assert _points(net, (1, 3, 28, 28))[-1] == ("1", "tied")  # 14x14 -> 7x7: an AVERAGE_POOL_2D
    assert _points(net, (1, 3, 14, 14))[-1] == ("0.0", "own")  # 7x7 -> 7x7: no op
    with pytest.raises(xqat.UnsupportedLayerError, match=r"38x8 -> 7x7: its windows along H are 6, 7 pixels long.*"
                                                          r"Fix: use an input size"):
        xqat.prepare_qat(net, torch.rand(1, 3, 76, 16))


# -- layers whose gain s_in * s_w / s_out exceeds 1 (MNASNet at 32x32) -------------------------------------------
class GainConv(nn.Module):
    """One conv (+ BN) + ReLU6 on the input, weights so large that one input step times one weight step is worth
    several output LSB (gain s_in * s_w / s_out of ~6): the int32 bias grid s_in * s_w is then coarser than the
    output grid, and its rounding (docs/numerics.md#bias) moves outputs by several LSB. Sparse inputs put many
    windows at exactly 0, where the output is the bias alone."""

    def __init__(self, k: int, stride: int, depthwise: bool, bn: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, k, stride, k // 2, groups=4 if depthwise else 1, bias=not bn)
        self.bn = nn.BatchNorm2d(4, momentum=0.0) if bn else nn.Identity()  # calibration keeps its statistics
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.conv.weight.copy_((torch.rand(self.conv.weight.shape, generator=g) * 2 - 1) * 5000)
            bias = torch.rand(4, generator=g) * 5 + 0.5  # inside ReLU6's band
            if bn:  # the same layer as a BN fold: w * 1000, bias = beta - mean * 1000
                self.conv.weight.div_(1000)
                self.bn.weight.fill_(1000.0)
                self.bn.running_var.fill_(1.0 - self.bn.eps)
                self.bn.running_mean.copy_(torch.rand(4, generator=g) * 1e-3)
                self.bn.bias.copy_(bias + self.bn.running_mean * 1000)
            else:
                self.conv.bias.copy_(bias)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class GainLinear(nn.Module):
    """The same for a Linear layer (per-tensor weight scale)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            self.fc.weight.copy_((torch.rand(self.fc.weight.shape, generator=g) * 2 - 1) * 5000)
            self.fc.bias.copy_(torch.rand(6, generator=g) * 5 + 0.5)
        self.act = nn.ReLU6()

    def forward(self, x):
        return self.act(self.fc(torch.flatten(x, 1)))


def test_each_weight_layer_is_linked_to_its_input_range_group_also_in_a_copy():
    """The int32 bias grid is s_in * s_w: each conv / linear knows its input's quantizer, through a folded flatten
    too, and a deep copy (what export and parity work on) links to its own quantizers."""
    import copy

    net = nn.Sequential(_conv(3, 8, 2), nn.Flatten(), nn.Linear(8 * 2 * 2, 4))
    qat = xqat.prepare_qat(net.eval(), torch.rand(1, 3, 4, 4))
    group = {p.label: p.group for p in xqat.quant_points(qat)}
    assert qat.get_submodule("0.0")._input_quantizer is qat.xqat_quantizers[group["input:input_1"]]
    assert qat.get_submodule("2")._input_quantizer is qat.xqat_quantizers[group["0.0"]]
    twin = copy.deepcopy(qat)
    assert twin.get_submodule("2")._input_quantizer is twin.xqat_quantizers[group["0.0"]]


GAIN_CASES = {  # name -> (model factory, input shape): the degenerate maps of MNASNet at 32x32 and a plain one
    "dw3_s1_1x1": (lambda: GainConv(3, 1, True, False), (1, 4, 1, 1)),
    "dw5_s1_2x2_bn": (lambda: GainConv(5, 1, True, True), (1, 4, 2, 2)),
    "dw5_s2_3x3_bn": (lambda: GainConv(5, 2, True, True), (1, 4, 3, 3)),
    "dw3_s2_8x8": (lambda: GainConv(3, 2, True, False), (1, 4, 8, 8)),
    "conv3_s1_6x6_bn": (lambda: GainConv(3, 1, False, True), (1, 4, 6, 6)),
    "linear": (GainLinear, (1, 4, 1, 1)),  # also: the input's no-op flatten fused into FULLY_CONNECTED, its
    # tensor then has no layer name ("tfl.quantize") and is located as the one input left
}


def _sparse(shape, seed):
    """Inputs in [0, 1], nine tenths exactly 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) > 0.9)


@pytest.fixture(scope="module")
def gain_exported(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("gain"), {}
    for name, (factory, shape) in GAIN_CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = xqat.prepare_qat(factory().eval(), torch.rand(shape)).train()
            with torch.no_grad():  # calibration: dense inputs, so the input range is [0, 1]
                for i in range(4):
                    qat(torch.rand(8, *shape[1:], generator=torch.Generator().manual_seed(10 + i)))
            qat.eval()
            path = folder / f"{name}.tflite"
            try:
                report = xqat.export_tflite(qat, torch.rand(shape), path)
            except Exception as e:  # noqa: BLE001 -- reported by the tests of that case
                report = e
        out[name] = (qat, path, report, shape)
    return out


@pytest.mark.parametrize("name", list(GAIN_CASES))
def test_large_gain_layer_simulates_the_int32_bias_grid(gain_exported, name):
    """Strict export, layer gain above 1 (else the case tests nothing), every output code identical or 1 LSB
    away on every backend, and the emulator equal to the interpreter."""
    from tests.zoo_check import emulator_matches

    qat, path, report, shape = gain_exported[name]
    if isinstance(report, Exception):
        raise report
    assert report.ok and report.all_qparams_equal, report.problems()
    m = read_tflite(path)
    op = next(o for o in m.ops if o.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))
    s_in, s_out = m.tensors[op.inputs[0]].scales[0], m.tensors[op.outputs[0]].scales[0]
    assert max(m.tensors[op.inputs[1]].scales) * s_in / s_out > 3
    x = _sparse((16, *shape[1:]), 5)
    for backend in BACKENDS:
        r = xqat.parity(qat, path, x, backend=backend, layerwise=True)
        assert all(row.max_abs <= 1 for row in r.outputs), r.table()
        assert emulator_matches(path, (x,), backend)


@pytest.mark.parametrize("name", ["dw5_s1_2x2_bn", "linear"])
def test_simulated_bias_is_the_int32_bias_of_the_tflite(gain_exported, name):
    qat, path, report, _ = gain_exported[name]
    if isinstance(report, Exception):
        raise report
    layer = next(m for m in qat.modules() if isinstance(m, WeightQuantizedModule))
    _, _, bias = layer.export_weights()
    m = read_tflite(path)
    op = next(o for o in m.ops if o.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))
    b = m.tensors[op.inputs[2]]
    codes = bias.double().numpy() / b.scales.astype("float64")
    assert (codes.round() == b.data).all() and abs(codes - b.data).max() < 0.01  # float32 on the int32 grid
    float_bias = layer.folded()[1].detach().double().numpy() / b.scales.astype("float64")
    assert abs(float_bias - b.data).max() > 0.05  # the float bias is off the grid: the case tests something


def test_bias_that_rounds_to_zero_on_the_int32_grid_exports(tmp_path):
    """A zero-initialised classifier bias after a few steps (torchvision MobileNetV3): tiny values that the int32
    grid rounds to 0, so the deployed bias is all zero and the converter leaves it out; strict export accepts it."""
    net = nn.Sequential(_conv(3, 8, 2), nn.Flatten(), nn.Linear(8 * 2 * 2, 4))
    with torch.no_grad():
        net[2].bias.copy_(torch.tensor([1e-12, -1e-12, 2e-12, 0.0]))
    qat = xqat.prepare_qat(net.eval(), torch.rand(1, 3, 4, 4)).train()
    with torch.no_grad():
        for i in range(3):
            qat(torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(i)))
    qat.eval()
    layer = qat.get_submodule("2")
    assert layer.folded()[1].any() and not layer.export_weights()[2].any()  # float bias nonzero, deployed zero
    report = xqat.export_tflite(qat, torch.rand(1, 3, 4, 4), tmp_path / "m.tflite")
    assert report.ok and report.all_qparams_equal, report.problems()
