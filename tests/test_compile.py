"""A prepare_qat model under torch.compile, in training: one graph (fullgraph=True, no graph breaks) and the same
state and numerics as eager. Without float reductions (BN batch statistics, a global mean) the whole training step
is bit-identical, given Inductor's layout optimization off (channels-last convs sum in another order); with them the
summation order is Inductor's, so there the test asks for closeness."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xqat
from xqat.demo.nets import ResNetSmall
from xqat.torch_side.quantizers import ActivationQuantizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (so -0.0 != 0.0)."""
    t = t.detach()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Same bits, NaN payloads aside (a NaN is a NaN; its payload is no result)."""
    if a.is_floating_point():
        nan = torch.isnan(a)
        assert torch.equal(nan, torch.isnan(b)), f"{what}: NaN positions differ between eager and torch.compile"
        a, b = torch.where(nan, 0.0, a), torch.where(nan, 0.0, b)
    assert torch.equal(_bits(a), _bits(b)), f"{what} differs between eager and torch.compile"


class _NoBN(nn.Module):
    """conv+ReLU6, depthwise conv+ReLU, residual add, flatten, linear: the QAT modules without float reductions."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 12 * 12, 5)

    def forward(self, x):
        y = F.relu6(self.c1(x))
        y = y + F.relu(self.c2(y))
        return self.fc(y.flatten(1))


EXACT = {"layout_optimization": False}  # Inductor option: convs in the eager memory format, same sums


def _pair(net: nn.Module, x: torch.Tensor, config: xqat.QATConfig, options: dict | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = xqat.prepare_qat(net.eval(), x[:1], config).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    return eager, compiled, torch.compile(compiled, fullgraph=True, options=options)


def _train_step(model, call, x, g, opt):
    out = call(x)
    out.backward(g)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    return out.detach(), grads


def _paired_steps(eager, compiled, call, steps: int, x_shape, g_shape, lr: float, scale_by_step: bool = False):
    """Train eager and compiled side by side on the same batches; assert each step's outputs are the same bits and
    yield (step, eager gradients, compiled gradients) for the caller's gradient check."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (eager, compiled)]
    for step in range(steps):
        xb, g = torch.randn(*x_shape) * (step + 1 if scale_by_step else 1), torch.randn(*g_shape)
        out_e, grads_e = _train_step(eager, eager, xb, g, opts[0])
        out_c, grads_c = _train_step(compiled, call, xb, g, opts[1])
        _assert_same_bits(out_e, out_c, f"step {step + 1} output")
        yield step, grads_e, grads_c


def test_compiled_training_is_one_graph_and_bit_identical_without_bn():
    """quant_delay=1: step 1 passes activations and weights through, steps 2-3 quantize; ranges, step counters,
    outputs and every parameter gradient are the same bits as eager."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    eager, compiled, call = _pair(_NoBN(), x, xqat.QATConfig(quant_delay=1), EXACT)
    for step, grads_e, grads_c in _paired_steps(eager, compiled, call, 3, (4, 3, 12, 12), (4, 5), 0.1, True):
        assert grads_e.keys() == grads_c.keys()
        for k in grads_e:
            _assert_same_bits(grads_e[k], grads_c[k], f"step {step + 1} gradient of {k}")
    state_e, state_c = eager.state_dict(), compiled.state_dict()
    for k in state_e:
        _assert_same_bits(state_e[k], state_c[k], f"state {k}")
    assert int(state_c[next(k for k in state_c if k.endswith(".step"))]) == 3


def test_compiled_bn_fold_training_is_one_graph_with_eager_semantics():
    """ResNet-style net: BN fold, residual adds, global mean (pool rounding), linear. Traced into one graph and run
    with eager kernels (backend aot_eager), three steps are bit-identical to eager (gradients: equal values; the sign
    of a zero may differ where both fold forms run) across the freeze_bn_delay switch to the moving statistics: the
    graph form has eager's semantics. (Inductor then only changes the summation order of reductions.)"""
    eager, compiled, call = _aot_pair(xqat.QATConfig(freeze_bn_delay=1))
    for step, grads_e, grads_c in _paired_steps(eager, compiled, call, 3, (2, 3, 16, 16), (2, 10), 0.01):
        for k in grads_e:
            assert torch.equal(grads_e[k], grads_c[k]), f"step {step + 1} gradient of {k}"
    state_e, state_c = eager.state_dict(), compiled.state_dict()
    for k in state_e:
        _assert_same_bits(state_e[k], state_c[k], f"state {k}")


def test_compiled_learned_ranges_follow_eager():
    """quant_delay=1, range learning from step 2: one graph; the forward is bit-identical at the switch, the
    gradients equal to float rounding (learned min/max: TF's sums), and ranges not learned yet get a zero gradient
    compiled (none eager), the same SGD update."""
    eager, compiled, call = _aot_pair(xqat.QATConfig(learn_ranges=True, range_warmup_steps=2, quant_delay=1))
    for step, grads_e, grads_c in _paired_steps(eager, compiled, call, 2, (2, 3, 16, 16), (2, 10), 0.01):
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-6, msg=f"step {step + 1}: {k}")
    assert int(compiled.state_dict()["xqat_quantizers.fc.step"]) == 2


def _aot_pair(config):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = xqat.prepare_qat(ResNetSmall(width=4, depth=1).eval(), x[:1], config).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    return eager, compiled, torch.compile(compiled, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("ema,outliers", [("debias", "skip"), ("tfmot", "use")])
def test_compiled_range_updates_match_eager_through_nan_and_outlier_batches(ema, outliers):
    """The graph form of the EMA: non-finite values left out, all-NaN batches skipped, absurd ranges skipped
    until the third in a row (or used), counters and the (bit-identical) ranges and outputs as in eager."""
    eager = ActivationQuantizer(ema=ema, outliers=outliers).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    call = torch.compile(compiled, fullgraph=True)
    torch.manual_seed(1)
    batches = [torch.randn(64), torch.randn(64) * 3]
    nan_part = torch.randn(64)
    nan_part[::3] = float("nan")
    nan_part[1] = float("inf")
    batches += [nan_part, torch.full((64,), float("nan"))]
    batches += [torch.randn(64) * 1e5 for _ in range(4)] + [torch.randn(64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, b in enumerate(batches):
            _assert_same_bits(eager(b.clone()), call(b.clone()), f"output of batch {i}")
            for k, v in eager.state_dict().items():
                _assert_same_bits(v, compiled.state_dict()[k], f"{k} after batch {i}")
            assert int(eager.outlier_streak) == int(compiled.outlier_streak)
    assert int(compiled.nan_count) == 2 and int(compiled.outlier_count) >= (3 if outliers == "skip" else 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a lent GPU machine)")
def test_cuda_qat_conv_uses_no_tf32_and_compiled_matches_eager():
    """With TF32 allowed globally (cuDNN's default), an eager QAT conv still computes in full float32: its output is
    the same conv with TF32 off, bit for bit, and the caller's setting survives. Compiled on CUDA (inside
    `exact_cuda_math`, as the docs ask) the training step matches eager CUDA bit for bit."""
    from xqat.torch_side.modules import QConv2d
    from xqat.torch_side.traced import exact_cuda_math

    torch.manual_seed(0)
    x = torch.randn(4, 3, 12, 12)
    eager, compiled, _ = _pair(_NoBN(), x, xqat.QATConfig())
    eager, compiled = eager.cuda(), compiled.cuda()
    conv = next(m for m in eager.modules() if isinstance(m, QConv2d) and m.conv.groups == 1)
    xb = torch.randn(4, 3, 12, 12, device="cuda")
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        got = conv(xb)
        assert torch.backends.cudnn.allow_tf32
        with exact_cuda_math():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            ref = F.hardtanh(conv.functional(xb, conv.weight_quant(conv.conv.weight), conv.conv.bias), 0.0, 6.0)
        _assert_same_bits(got, ref, "QAT conv on CUDA")
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
        call = torch.compile(compiled, fullgraph=True, options=EXACT)
        with exact_cuda_math():
            for _ in range(2):
                xs, g = torch.randn(4, 3, 12, 12, device="cuda"), torch.randn(4, 5, device="cuda")
                out_e, grads_e = _train_step(eager, eager, xs, g, opts[0])
                out_c, grads_c = _train_step(compiled, call, xs, g, opts[1])
                _assert_same_bits(out_e, out_c, "CUDA output")
                for k in grads_e:
                    _assert_same_bits(grads_e[k], grads_c[k], f"CUDA gradient of {k}")
    finally:
        torch.backends.cudnn.allow_tf32 = saved
