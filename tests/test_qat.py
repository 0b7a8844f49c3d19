"""QAT torch side: BN folding, EMA modes, delays, learned ranges, placement, state, errors."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xqat
from tests.models import EXPECTED_POINTS, INPUT_SHAPE, MODELS, make_model
from xqat.torch_side.modules import QConv2d
from xqat.torch_side.quantizers import ActivationQuantizer


def _conv_bn(seed=0, groups=1, cin=4, cout=6):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=True)
    bn = nn.BatchNorm2d(cout)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return conv, bn


# -- BN folding (docs/numerics.md#bn-folding) --------------------------------------------------------------------------
@pytest.mark.parametrize("groups,cin", [(1, 4), (6, 6)])
def test_eval_conv_bn_equals_folded_conv_bitwise(groups, cin):
    conv, bn = _conv_bn(groups=groups, cin=cin)
    q = QConv2d(conv, bn, act="relu").eval()
    x = torch.randn(2, cin, 8, 8)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_fold = conv.weight * factor.reshape(-1, 1, 1, 1)
    b_fold = bn.bias + (conv.bias - bn.running_mean) * factor
    m = w_fold.detach().abs().reshape(w_fold.shape[0], -1).amax(1)
    ref = F.relu(F.conv2d(x, xqat.fake_quant_per_channel(w_fold, -m, m, 8, True, axis=0), b_fold, padding=1,
                          groups=groups))
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("bn_stats", ["float", "quantized"])
def test_training_fold_before_freeze_matches_contrib_formula(bn_stats):
    conv, bn = _conv_bn()
    q = QConv2d(conv, bn, bn_stats=bn_stats).train()
    rv, rm = bn.running_var.clone(), bn.running_mean.clone()
    x = torch.randn(8, 4, 8, 8)
    y = q(x)
    sigma_mv = torch.sqrt(rv + bn.eps)
    w_fold = conv.weight * (bn.weight / sigma_mv).reshape(-1, 1, 1, 1)
    m = w_fold.detach().abs().reshape(6, -1).amax(1)
    y_q = F.conv2d(x, xqat.fake_quant_per_channel(w_fold, -m, m, 8, True, axis=0), None, padding=1)
    stats = F.conv2d(x, conv.weight, None, padding=1) if bn_stats == "float" else \
        y_q / (bn.weight / sigma_mv).reshape(1, -1, 1, 1)
    mean_b, var_b = stats.mean((0, 2, 3)), stats.var((0, 2, 3), unbiased=False)
    sigma_b = torch.sqrt(var_b + bn.eps)
    shift = (bn.bias - mean_b * bn.weight / sigma_b).reshape(1, -1, 1, 1)
    ref = y_q * (sigma_mv / sigma_b).reshape(1, -1, 1, 1) + shift
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    # the moving statistics were updated like BatchNorm2d's own (conv bias included in the mean)
    n = 8 * 8 * 8
    torch.testing.assert_close(bn.running_mean, 0.9 * rm + 0.1 * (mean_b + conv.bias).detach())
    torch.testing.assert_close(bn.running_var, 0.9 * rv + 0.1 * var_b.detach() * n / (n - 1))


def test_training_fold_with_float_stats_equals_plain_bn_without_quantization():
    """With quantization delayed, the docs/numerics.md#bn-folding fold is exactly conv -> BN(train) in value."""
    conv, bn = _conv_bn()
    ref_conv, ref_bn = _conv_bn()
    q = QConv2d(conv, bn, quant_delay=10, bn_stats="float").train()
    x = torch.randn(8, 4, 8, 8)
    torch.testing.assert_close(q(x), ref_bn.train()(ref_conv(x)), rtol=1e-5, atol=1e-5)


def test_training_after_freeze_is_the_inference_form():
    conv, bn = _conv_bn()
    q = QConv2d(conv, bn, freeze_bn_delay=2).train()
    x = torch.randn(4, 4, 8, 8)
    q(x)
    q(x)
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    y_train = q(x)  # third step: frozen
    assert bool(q.bn_frozen)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(y_train, q.eval()(x))


def test_bn_fold_gradients_reach_weights_and_bn_params():
    conv, bn = _conv_bn()
    q = QConv2d(conv, bn).train()
    q(torch.randn(4, 4, 8, 8)).square().mean().backward()
    assert conv.weight.grad.abs().sum() > 0 and bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0


# -- EMA modes (docs/numerics.md#ema) -----------------------------------------------------------------------------
def test_debias_ema_first_step_is_batch_range_and_follows_contrib():
    """tf.contrib zero_debias=True: init ignored; batch mins 0, -1, -1 give 0, -0.50026, -0.66700
    (docs/numerics.md#ema)."""
    q = ActivationQuantizer(ema="debias").train()
    seen = []
    for bmin in (0.0, -1.0, -1.0):
        q(torch.tensor([bmin, 2.0]))
        seen.append(float(q.min))
    assert seen[0] == 0.0
    assert seen[1] == pytest.approx(-0.50026, abs=1e-5) and seen[2] == pytest.approx(-0.66700, abs=1e-5)
    assert float(q.max) == pytest.approx(2.0, rel=1e-4)  # a constant batch max is tracked from step 1


def test_debias_ema_matches_formula_exactly_over_steps():
    q = ActivationQuantizer(ema="debias", decay=0.99).train()
    rng = np.random.default_rng(0)
    biased = np.float32(0)
    d1 = np.float32(1 - 0.99)
    for t in range(1, 30):
        x = rng.normal(size=100).astype(np.float32) * (1 + t % 3)
        q(torch.from_numpy(x))
        r = np.float32(max(x.max(), 0))
        biased = np.float32(biased - (biased - r) * d1)
        expect = np.float32(biased / np.float32(1 - np.float32(np.float32(1) - d1) ** np.float32(t)))
        assert float(q.max) == pytest.approx(float(expect), rel=2e-6)


def test_tfmot_ema_reproduces_spec_numbers():
    """docs/numerics.md#ema: init +-6, decay 0.001 in float32, updated before the same step's fake quant."""
    q = ActivationQuantizer(ema="tfmot").train()
    q(torch.tensor([-1.0, 7.0]))
    assert float(q.min) == pytest.approx(-5.995, abs=1e-6) and float(q.max) == pytest.approx(6.001, abs=1e-6)
    relu = ActivationQuantizer(ema="tfmot").train()
    x = torch.tensor([0.0, 3.0])
    relu(x)
    assert float(relu.min) == pytest.approx(-5.994, abs=1e-6)
    for _ in range(239):
        relu(x)
    assert float(relu.min) == pytest.approx(-4.719202, abs=2e-6)
    assert float(relu.min) == pytest.approx(-6 * 0.999 ** 240, abs=1e-4)


def test_tfmot_update_precedes_fake_quant_of_same_step():
    q = ActivationQuantizer(ema="tfmot").train()
    x = torch.linspace(-1, 7, 101)
    y = q(x)
    assert torch.equal(y, xqat.fake_quant(x, float(q.min), float(q.max)))


def test_quant_delay_collects_ranges_without_quantizing():
    q = ActivationQuantizer(quant_delay=3).train()
    x = torch.linspace(-1, 3, 1001)
    for _ in range(3):
        assert torch.equal(q(x), x)
    assert float(q.min) == pytest.approx(-1.0, rel=1e-4) and float(q.max) == pytest.approx(3.0, rel=1e-4)
    assert not torch.equal(q(x), x)


def test_freeze_ranges_stops_updates_but_keeps_quantizing():
    model = xqat.prepare_qat(make_model("plain"), torch.randn(INPUT_SHAPE)).train()
    model(torch.randn(4, 3, 16, 16))
    xqat.freeze_ranges(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "xqat_quantizers" in k}
    model(torch.randn(4, 3, 16, 16) * 5)
    after = {k: v for k, v in model.state_dict().items() if "xqat_quantizers" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_learned_ranges_get_tf_gradient_after_warmup():
    q = ActivationQuantizer(learn=True, warmup=2).train()
    x = torch.linspace(-2, 2, 401)
    q(x * 0.5)
    q(x * 0.5)  # EMA warm-up: range ~[-1, 1]
    assert isinstance(q.min, nn.Parameter) and q.min.grad is None
    y = q(x)
    g = torch.ones_like(x)
    y.backward(g)
    nmin = float(xqat.nudge(q.min.detach(), q.max.detach()).nudged_min)
    nmax = float(xqat.nudge(q.min.detach(), q.max.detach()).nudged_max)
    assert float(q.min.grad) == float((x < nmin).sum()) and float(q.max.grad) == float((x > nmax).sum())
    assert float(q.min.grad) > 0


# -- placement, state, errors ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_fake_quant_points_where_tflite_has_tensors(name):
    qat = xqat.prepare_qat(make_model(name), torch.randn(INPUT_SHAPE))
    assert [(p.label, p.role) for p in xqat.quant_points(qat)] == EXPECTED_POINTS[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in qat.named_modules() if not n.endswith(".bn"))


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trip_and_deterministic_eval(name):
    x = torch.randn(8, 3, 16, 16)
    a = xqat.prepare_qat(make_model(name), x[:1], xqat.QATConfig(freeze_bn_delay=3)).train()
    for i in range(4):
        a(x + 0.1 * i)
    b = xqat.prepare_qat(make_model(name, seed=5), x[:1], xqat.QATConfig(freeze_bn_delay=3))
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))
    a.train(), b.train()
    torch.manual_seed(1)
    ya = a(x)
    torch.manual_seed(1)
    assert torch.equal(ya, b(x))  # step counters and freeze flags came along


def test_eval_is_deterministic_and_quantized():
    qat = xqat.prepare_qat(make_model("mobilenet_v2"), torch.randn(INPUT_SHAPE)).train()
    for _ in range(3):
        qat(torch.randn(4, 3, 16, 16))
    qat.eval()
    x = torch.randn(2, 3, 16, 16)
    y = qat(x)
    s, zp = qat.xqat_quantizers["fc"].scale_zero_point()
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # outputs sit on the output grid


def test_unsupported_op_error_names_node_op_path_and_skip():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus())

        def forward(self, x):
            return self.body(x)

    with pytest.raises(xqat.UnsupportedLayerError) as e:
        xqat.prepare_qat(Net(), torch.randn(1, 3, 8, 8))
    msg = str(e.value)
    assert "body.1" in msg and "Softplus" in msg and "skip=['body.1']" in msg and "int8 kernel" in msg
    with pytest.warns(UserWarning, match="is skipped"):
        qat = xqat.prepare_qat(Net(), torch.randn(1, 3, 8, 8), xqat.QATConfig(skip=["body.1"]))
    assert qat(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)


def test_grouped_conv_is_split_and_lonely_bn_becomes_a_depthwise_conv():
    qat = xqat.prepare_qat(nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), torch.randn(1, 4, 8, 8))
    assert {"0_g0", "0_g1"} <= {n for n, m in qat.named_modules() if isinstance(m, QConv2d)}
    with pytest.raises(xqat.UnsupportedLayerError, match="grouped ConvTranspose2d.*groups=2.*per-group"):
        xqat.prepare_qat(nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2)), torch.randn(1, 4, 8, 8))
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    qat = xqat.prepare_qat(net, torch.randn(1, 3, 8, 8))
    assert [p.label for p in xqat.quant_points(qat)] == ["input:input_1", "0_dwconv", "1"]
    dw = qat.get_submodule("0_dwconv")
    assert isinstance(dw, QConv2d) and dw.is_depthwise and dw.bn is not None


def test_untraceable_model_gets_a_clear_error():
    class Dynamic(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(xqat.UnsupportedLayerError, match="torch.fx cannot capture Dynamic"):
        xqat.prepare_qat(Dynamic(), torch.randn(1, 3))


def test_config_validation_and_non_8bit_warning():
    with pytest.raises(xqat.QATConfigError, match="ema"):
        xqat.QATConfig(ema="bogus")
    with pytest.raises(xqat.QATConfigError, match="activation_bits"):
        xqat.QATConfig(activation_bits=20)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        xqat.QATConfig(weight_bits=4)
    assert any("cannot be exported" in str(x.message) for x in w)


def test_prepare_does_not_touch_the_float_model():
    m = make_model("plain")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qat = xqat.prepare_qat(m, torch.randn(INPUT_SHAPE)).train()
    qat(torch.randn(4, 3, 16, 16))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert math.isfinite(float(qat.xqat_quantizers["x"].max))


def test_edgetpu_config_refuses_unmappable_layers_at_prepare_time():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.act = nn.LeakyReLU()

        def forward(self, x):
            return F.gelu(self.act(self.conv(x)))

    with pytest.raises(xqat.UnsupportedLayerError, match="EdgeTPU") as e:
        xqat.prepare_qat(Net(), torch.randn(1, 3, 8, 8), xqat.QATConfig(edgetpu=True))
    assert "act" in str(e.value) and "LeakyReLU" in str(e.value) and "gelu" in str(e.value).lower()
    ok = xqat.prepare_qat(make_model("mobilenet_v2"), torch.randn(INPUT_SHAPE), xqat.QATConfig(edgetpu=True))
    assert xqat.qat_config(ok).edgetpu
