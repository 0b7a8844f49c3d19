"""xqat.fake_quant / fake_quant_per_channel against TensorFlow's own kernels (docs/numerics.md#fake-quant)."""

import numpy as np
import pytest
import torch

import xqat
from tests.oracle import bit_mismatches, random_range, tie_heavy_inputs

CONFIGS = 300  # random (num_bits, narrow_range, range) configs; ~6k tie-heavy elements each


def _tf_fq(tf, x, mn, mx, nb, nr):
    return tf.quantization.fake_quant_with_min_max_vars(x, mn, mx, num_bits=nb, narrow_range=nr).numpy()


def test_forward_per_tensor_bit_exact_over_random_configs(tf):
    rng = np.random.default_rng(1234)
    total = mismatches = 0
    for i in range(CONFIGS):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        mn, mx = random_range(rng, i % 6)
        x = tie_heavy_inputs(rng, mn, mx, nb, nr)
        ref = _tf_fq(tf, x, mn, mx, nb, nr)
        got = xqat.fake_quant(torch.from_numpy(x), float(mn), float(mx), nb, nr).numpy()
        mismatches += bit_mismatches(ref, got)
        total += x.size
    assert total >= 1_000_000
    assert mismatches == 0, f"{mismatches} of {total} elements differ from TF bitwise"


@pytest.mark.parametrize("rank,axis", [(2, -1), (2, 0), (4, -1), (4, 0), (4, 1)])
def test_forward_per_channel_bit_exact(tf, rank, axis):
    rng = np.random.default_rng(rank * 10 + axis)
    total = mismatches = 0
    for i in range(40):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        channels = int(rng.integers(1, 7))
        ranges = [random_range(rng, (i + c) % 6) for c in range(channels)]
        cols = [tie_heavy_inputs(rng, mn, mx, nb, nr, n=300)[:1200] for mn, mx in ranges]
        x_last = np.stack(cols, axis=-1)  # [1200, C]: TF layout, channel last
        if rank == 4:
            x_last = x_last.reshape(4, 10, 30, channels)
        mins = np.array([r[0] for r in ranges], np.float32)
        maxs = np.array([r[1] for r in ranges], np.float32)
        ref = tf.quantization.fake_quant_with_min_max_vars_per_channel(x_last, mins, maxs, nb, nr).numpy()
        x_t = torch.from_numpy(x_last).movedim(-1, axis)
        got = xqat.fake_quant_per_channel(x_t, torch.from_numpy(mins), torch.from_numpy(maxs), nb, nr, axis=axis)
        mismatches += bit_mismatches(ref, got.movedim(axis, -1).numpy())
        total += x_last.size
    assert mismatches == 0, f"{mismatches} of {total} elements differ from TF bitwise"


def test_division_and_multiplication_forms_differ_near_ties(tf):
    """docs/numerics.md#forward: per-tensor divides, per-channel multiplies by inv_scale; both must match their TF
    op."""
    rng = np.random.default_rng(7)
    diff = 0
    for _ in range(30):
        mn, mx = random_range(rng, 0)
        x = tie_heavy_inputs(rng, mn, mx, 8, False)
        a = xqat.fake_quant(torch.from_numpy(x), float(mn), float(mx)).numpy()
        b = xqat.fake_quant_per_channel(torch.from_numpy(x[:, None]), [float(mn)], [float(mx)]).numpy()[:, 0]
        diff += bit_mismatches(a, b)
    assert diff > 0, "the two TF op forms should disagree somewhere on tie-heavy data"


@pytest.mark.parametrize(
    "mn,mx,expected_range",
    [(0.5, 2.0, (0.0, 1.5)), (-2.0, -0.5, (-1.5, 0.0)), (0.0, 0.0, (0.0, 0.0))],
)
def test_edge_ranges_match_tf(tf, mn, mx, expected_range):
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    ref = _tf_fq(tf, x, mn, mx, 8, False)
    got = xqat.fake_quant(torch.from_numpy(x), mn, mx).numpy()
    assert bit_mismatches(ref, got) == 0
    assert got.min() == pytest.approx(expected_range[0], abs=1e-6)
    assert got.max() == pytest.approx(expected_range[1], abs=1e-6)


def test_nudge_matches_tf_grid(tf):
    """The nudged bounds are the fake-quant of +-huge values; the scale is their step."""
    rng = np.random.default_rng(3)
    for i in range(200):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        mn, mx = random_range(rng, i % 6)
        g = xqat.nudge(mn, mx, nb, nr)
        ends = _tf_fq(tf, np.array([-1e30, 1e30], np.float32), mn, mx, nb, nr)
        assert ends[0] == g.nudged_min.item() or (ends[0] == 0 and g.nudged_min.item() == 0)
        assert ends[1] == g.nudged_max.item()
        assert g.scale.dtype == torch.float32 and g.zero_point.dtype == torch.float32
        qmin = 1 if nr else 0
        assert float(g.zero_point) == pytest.approx(qmin - float(g.nudged_min) / float(g.scale), rel=1e-6, abs=1e-3)


def _tf_grads(tf, x, g, mn, mx, nb, nr, per_channel):
    xv, mnv, mxv = tf.Variable(x), tf.Variable(mn), tf.Variable(mx)
    with tf.GradientTape() as tape:
        if per_channel:
            y = tf.quantization.fake_quant_with_min_max_vars_per_channel(xv, mnv, mxv, nb, nr)
        else:
            y = tf.quantization.fake_quant_with_min_max_vars(xv, mnv, mxv, nb, nr)
        loss = tf.reduce_sum(y * g)
    return [t.numpy() for t in tape.gradient(loss, [xv, mnv, mxv])]


def _torch_grads(x, g, mn, mx, nb, nr, per_channel, axis=-1):
    xt = torch.from_numpy(x).requires_grad_()
    mnt = torch.from_numpy(np.asarray(mn)).requires_grad_()
    mxt = torch.from_numpy(np.asarray(mx)).requires_grad_()
    if per_channel:
        y = xqat.fake_quant_per_channel(xt, mnt, mxt, nb, nr, axis=axis)
    else:
        y = xqat.fake_quant(xt, mnt, mxt, nb, nr)
    (y * torch.from_numpy(g)).sum().backward()
    return xt.grad.numpy(), mnt.grad.numpy(), mxt.grad.numpy()


def test_gradients_per_tensor_match_tf(tf):
    rng = np.random.default_rng(11)
    for i in range(60):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        mn, mx = random_range(rng, i % 6)
        x = tie_heavy_inputs(rng, mn, mx, nb, nr, n=200)
        g = rng.normal(size=x.shape).astype(np.float32)
        ref = _tf_grads(tf, x, g, mn, mx, nb, nr, False)
        got = _torch_grads(x, g, mn, mx, nb, nr, False)
        assert bit_mismatches(ref[0], got[0]) == 0, "dx must equal TF's exactly (inclusive nudged bounds)"
        # dmin/dmax are float sums: same elements, summation order may differ in the last bits.
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_gradients_bounds_are_inclusive_for_x_and_strict_for_range(tf):
    g = xqat.nudge(-1.0, 1.0)
    nmin, nmax = g.nudged_min.item(), g.nudged_max.item()
    x = np.array([nmin, nmax, np.nextafter(np.float32(nmax), np.float32(9)),
                  np.nextafter(np.float32(nmin), np.float32(-9)), 0.3], np.float32)
    up = np.array([1, 2, 4, 8, 16], np.float32)
    dx, dmin, dmax = _torch_grads(x, up, np.float32(-1), np.float32(1), 8, False, False)
    assert dx.tolist() == [1, 2, 0, 0, 16]
    assert float(dmin) == 8 and float(dmax) == 4
    ref = _tf_grads(tf, x, up, np.float32(-1), np.float32(1), 8, False, False)
    assert bit_mismatches(ref[0], dx) == 0 and float(ref[1]) == 8 and float(ref[2]) == 4


@pytest.mark.parametrize("rank,axis", [(2, -1), (4, 0)])
def test_gradients_per_channel_match_tf(tf, rank, axis):
    rng = np.random.default_rng(5 + rank)
    for i in range(10):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        channels = 5
        ranges = [random_range(rng, (i + c) % 6) for c in range(channels)]
        cols = [tie_heavy_inputs(rng, mn, mx, nb, nr, n=300)[:1200] for mn, mx in ranges]
        x_last = np.stack(cols, axis=-1)
        if rank == 4:
            x_last = x_last.reshape(4, 10, 30, channels)
        g = rng.normal(size=x_last.shape).astype(np.float32)
        mins = np.array([r[0] for r in ranges], np.float32)
        maxs = np.array([r[1] for r in ranges], np.float32)
        ref = _tf_grads(tf, x_last, g, mins, maxs, nb, nr, True)
        x_t = np.ascontiguousarray(np.moveaxis(x_last, -1, axis))
        g_t = np.ascontiguousarray(np.moveaxis(g, -1, axis))
        got = _torch_grads(x_t, g_t, mins, maxs, nb, nr, True, axis=axis)
        assert bit_mismatches(ref[0], np.moveaxis(got[0], axis, -1)) == 0
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got[2], ref[2], rtol=1e-5, atol=1e-4)


def test_zero_range_passes_gradient_and_outputs_zero(tf):
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    g = np.array([1.0, 2.0, 3.0], np.float32)
    dx, dmin, dmax = _torch_grads(x, g, np.float32(0), np.float32(0), 8, False, False)
    ref = _tf_grads(tf, x, g, np.float32(0), np.float32(0), 8, False, False)
    assert dx.tolist() == ref[0].tolist() == [1.0, 2.0, 3.0]
    assert float(dmin) == float(ref[1]) == 0 and float(dmax) == float(ref[2]) == 0
    assert xqat.fake_quant(torch.from_numpy(x), 0.0, 0.0).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_compute_in_float32(dtype):
    x = torch.linspace(-4, 4, 999, dtype=dtype, requires_grad=True)
    y = xqat.fake_quant(x, -2.0, 3.0)
    assert y.dtype == dtype
    ref = xqat.fake_quant(x.detach().float(), -2.0, 3.0).to(dtype)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert x.grad.dtype == dtype


def test_any_shape_and_rank():
    for shape in [(), (7,), (2, 3, 4, 5, 6)]:
        x = torch.randn(shape)
        assert xqat.fake_quant(x, -1.0, 1.0).shape == x.shape
    x = torch.randn(2, 3, 4, 5, 6)
    assert xqat.fake_quant_per_channel(x, -torch.ones(4), torch.ones(4), axis=2).shape == x.shape


def test_bad_input_messages():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="between 2 and 16"):
        xqat.fake_quant(x, -1.0, 1.0, num_bits=17)
    with pytest.raises(ValueError, match="between 2 and 16"):
        xqat.fake_quant(x, -1.0, 1.0, num_bits=1)
    with pytest.raises(TypeError, match="floating-point"):
        xqat.fake_quant(torch.arange(4), -1.0, 1.0)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        xqat.fake_quant_per_channel(x, -torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="scalar"):
        xqat.fake_quant(x, -torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="out of range"):
        xqat.fake_quant_per_channel(x, -torch.ones(3), torch.ones(3), axis=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a lent GPU machine)")
def test_cuda_matches_cpu_bitwise():
    rng = np.random.default_rng(99)
    for i in range(50):
        nb, nr = int(rng.integers(2, 17)), bool(rng.integers(0, 2))
        mn, mx = random_range(rng, i % 6)
        x = torch.from_numpy(tie_heavy_inputs(rng, mn, mx, nb, nr))
        cpu = xqat.fake_quant(x, float(mn), float(mx), nb, nr)
        gpu = xqat.fake_quant(x.cuda(), float(mn), float(mx), nb, nr).cpu()
        assert bit_mismatches(cpu.numpy(), gpu.numpy()) == 0
        xc = x.reshape(-1, 1).repeat(1, 3)
        mins, maxs = torch.tensor([mn] * 3), torch.tensor([mx] * 3)
        cpu = xqat.fake_quant_per_channel(xc, mins, maxs, nb, nr)
        gpu = xqat.fake_quant_per_channel(xc.cuda(), mins.cuda(), maxs.cuda(), nb, nr).cpu()
        assert bit_mismatches(cpu.numpy(), gpu.numpy()) == 0


# -- the same oracle under torch.compile (the path of a compiled QAT model): a few configs, compile is slow -------
def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.parametrize("nb,nr", [(8, False), (5, True)])
def test_compiled_per_tensor_forward_and_gradients_match_tf(tf, nb, nr):
    fq = _compiled(lambda x, mn, mx: xqat.fake_quant(x, mn, mx, nb, nr))
    rng = np.random.default_rng(nb)
    for i in range(12):
        if i < 11:
            mn, mx = random_range(rng, i % 6)
            x = tie_heavy_inputs(rng, mn, mx, nb, nr)
        else:  # min == max == 0: output 0, gradient passed (same shape: no recompile)
            mn, mx, x = np.float32(0), np.float32(0), rng.normal(size=4008).astype(np.float32)
        g = rng.normal(size=x.shape).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_()
        mnt, mxt = (torch.tensor(v, requires_grad=True) for v in (mn, mx))
        y = fq(xt, mnt, mxt)
        (y * torch.from_numpy(g)).sum().backward()
        assert bit_mismatches(_tf_fq(tf, x, mn, mx, nb, nr), y.detach().numpy()) == 0
        ref = _tf_grads(tf, x, g, mn, mx, nb, nr, False)
        assert bit_mismatches(ref[0], xt.grad.numpy()) == 0
        np.testing.assert_allclose(mnt.grad.numpy(), ref[1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mxt.grad.numpy(), ref[2], rtol=1e-5, atol=1e-5)


def test_compiled_per_channel_forward_and_gradients_match_tf(tf):
    nb, nr, channels = 8, True, 5
    fq = _compiled(lambda x, mn, mx: xqat.fake_quant_per_channel(x, mn, mx, nb, nr, axis=0))
    rng = np.random.default_rng(21)
    for i in range(6):
        ranges = [random_range(rng, (i + c) % 6) for c in range(channels)]
        x_last = np.stack([tie_heavy_inputs(rng, mn, mx, nb, nr, n=300)[:1200] for mn, mx in ranges], -1)
        x_last = x_last.reshape(4, 10, 30, channels)
        g = rng.normal(size=x_last.shape).astype(np.float32)
        mins = np.array([r[0] for r in ranges], np.float32)
        maxs = np.array([r[1] for r in ranges], np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_last, -1, 0))).requires_grad_()
        y = fq(xt, torch.from_numpy(mins), torch.from_numpy(maxs))
        (y * torch.from_numpy(np.ascontiguousarray(np.moveaxis(g, -1, 0)))).sum().backward()
        ref = tf.quantization.fake_quant_with_min_max_vars_per_channel(x_last, mins, maxs, nb, nr).numpy()
        assert bit_mismatches(ref, np.moveaxis(y.detach().numpy(), 0, -1)) == 0
        ref_dx = _tf_grads(tf, x_last, g, mins, maxs, nb, nr, True)[0]
        assert bit_mismatches(ref_dx, np.moveaxis(xt.grad.numpy(), 0, -1)) == 0


def test_use_fused_kernels_is_deprecated():
    with pytest.warns(DeprecationWarning, match="torch.compile"):
        xqat.use_fused_kernels(True)
