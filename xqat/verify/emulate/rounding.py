"""Integer rounding primitives of the TFLite int8 kernels, in torch int64 (docs/numerics.md, per-backend kernel rules).

Every function takes int64 tensors that hold the int32 values the C++ kernels hold, so the results
are the kernels' results bit for bit. Multiplier encodings (`quantize_multiplier`) run once per op on
numpy/python scalars; the per-element work runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "quantize_multiplier", "srdhm", "rdbp", "mbqm", "mbqm_ruy", "mbqm_single", "mbqm_floor", "round_half_away",
    "wrap_int32", "fp32_requantize", "float64_requantize", "mbqm_int", "one_floor_requantizer",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def quantize_multiplier(m) -> tuple[np.ndarray, np.ndarray]:
    """TFLite QuantizeMultiplier: m = q * 2^shift with q an int32 in [2^30, 2^31), elementwise.

    frexp, then round-half-away of q * 2^31; shifts below -31 flush to (0, 0). Exact in double.
    """
    m = np.atleast_1d(np.asarray(m, np.float64))
    mult = np.zeros(m.shape, np.int64)
    shift = np.zeros(m.shape, np.int64)
    for i, v in enumerate(m.ravel()):
        if v == 0.0:
            continue
        q, s = math.frexp(float(v))
        q_fixed = int(math.copysign(math.floor(abs(q) * (1 << 31) + 0.5), q))  # exact: q*2^31 has <= 53 bits
        if q_fixed == (1 << 31):
            q_fixed //= 2
            s += 1
        if s < -31:
            s, q_fixed = 0, 0
        mult.flat[i] = q_fixed
        shift.flat[i] = s
    return mult, shift


def wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement wrap of int64 values to int32, as C++ int32 arithmetic does on x86."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def srdhm(a: torch.Tensor, b) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul, i.e. (a*b + nudge) / 2^31 truncated.

    For every sign of a*b this equals floor((a*b + 2^30) / 2^31): with the negative nudge 1 - 2^30
    and truncation, negative ties round toward +inf too. So it is one add and one arithmetic shift;
    only a == b == INT32_MIN saturates.
    """
    out = (a * b).add_(1 << 30).bitwise_right_shift_(31)
    if isinstance(b, torch.Tensor) or b == INT32_MIN:
        overflow = (a == INT32_MIN) & (torch.as_tensor(b, device=a.device) == INT32_MIN)
        out = torch.where(overflow, torch.full_like(out, INT32_MAX), out)
    return out


def rdbp(x: torch.Tensor, exponent) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: arithmetic shift right, rounding half away from zero.

    Equals (x + 2^(e-1) - [x < 0]) >> e: the -1 for negative x turns the half-up shift into half-away;
    x >> 63 is that -[x < 0] for int64.
    """
    if not isinstance(exponent, torch.Tensor):
        if exponent == 0:
            return x
        return (x >> 63).add_(x).add_(1 << (int(exponent) - 1)).bitwise_right_shift_(int(exponent))
    half = torch.bitwise_left_shift(torch.ones_like(exponent), exponent) >> 1  # 0 where exponent == 0
    return (x + half + torch.where(exponent > 0, x >> 63, 0)) >> exponent


def _split_shift(shift):
    if isinstance(shift, torch.Tensor):
        return shift.clamp(min=0), (-shift).clamp(min=0)
    return max(int(shift), 0), max(-int(shift), 0)


def _left(x: torch.Tensor, left) -> torch.Tensor:
    """x * 2^left with the int32 wrap of the C++ expression `x * (1 << left_shift)`."""
    if isinstance(left, int) and left == 0:
        return x
    return wrap_int32(x << left)


def mbqm(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """TFLite MultiplyByQuantizedMultiplier, double rounding (pip build):
    RDBP(SRDHM(x * 2^left, M), right)."""
    left, right = _split_shift(shift)
    return rdbp(srdhm(_left(x, left), mult), right)


def mbqm_ruy(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """ruy's x86 AVX requantization: r = (x*2^left*M + 2^30) >> 31, then (r + 2^(e-1)) >> e.

    The first step is exactly SRDHM; the second rounds half up (toward +inf) where gemmlowp's RDBP
    rounds half away from zero, so the two differ only on negative ties of the final shift.
    """
    left, right = _split_shift(shift)
    r = srdhm(_left(x, left), mult)
    if isinstance(right, torch.Tensor):
        return (r + (torch.bitwise_left_shift(torch.ones_like(right), right) >> 1)) >> right
    if right == 0:
        return r
    return r.add_(1 << (right - 1)).bitwise_right_shift_(right)


def mbqm_single(x: torch.Tensor, mult, shift) -> torch.Tensor:
    """TFLITE_SINGLE_ROUNDING MultiplyByQuantizedMultiplier: (x*M + 2^(30-shift)) >> (31-shift)."""
    total = 31 - shift
    return (x * mult + (torch.bitwise_left_shift(torch.ones_like(total), total - 1)
                        if isinstance(total, torch.Tensor) else (1 << (total - 1)))) >> total


def mbqm_floor(x: torch.Tensor, mult: int, shift: int) -> torch.Tensor:
    """SRDHM(x, M), then a truncating arithmetic shift right by -shift (shift <= 0): the optimized int8 ADD's
    scalar-broadcast SIMD blocks (vqrdmulh, then vshl by a negative amount)."""
    return srdhm(x, mult) >> -shift


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C/C++ round()/TfLiteRound on any float dtype: ties away from zero, exact (no x+0.5 double rounding)."""
    t = torch.trunc(x)
    frac = x - t  # exact for floats
    return t + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


def fp32_requantize(acc: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int,
                    qmax: int) -> torch.Tensor:
    """XNNPACK "fp32" requantization: float32(acc) * scale, clamp to [qmin-zp, qmax-zp], round half
    even (lrintf / magic-bias), + zp. `scale` is a float32 tensor broadcast over the channel (last) dim."""
    v = acc.to(torch.float32) * scale
    v = v.clamp(float(qmin - zero_point), float(qmax - zero_point))
    return torch.round(v).to(torch.int64) + zero_point


def float64_requantize(acc: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """TFLite reference FULLY_CONNECTED: round_half_away(double(acc) * double multiplier)."""
    return round_half_away(acc.to(torch.float64) * multiplier).to(torch.int64)


# ---------------------------------------------------------------------------------------------
# MBQM + zero point + clamp as one floor in float64 (the fast path of the conv/FC/MEAN output stages)


def mbqm_int(x: int, mult: int, shift: int, ruy: bool = False) -> int:
    """MultiplyByQuantizedMultiplier of one Python integer (gemmlowp, or ruy's half-up last shift), no wrap."""
    left, right = max(shift, 0), max(-shift, 0)
    r = ((x << left) * mult + (1 << 30)) >> 31  # SRDHM = floor((a*M + 2^30) / 2^31) for every sign
    if right == 0:
        return r
    return (r + (1 << (right - 1)) - (0 if ruy or r >= 0 else 1)) >> right


_F64_INTS = 1 << 53  # float64 holds every integer below this exactly


def _first(pred, lo: int, hi: int) -> int:
    """Smallest x in [lo, hi] with pred(x) (monotone pred, pred(hi) true)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def one_floor_requantizer(mult, shift, ruy, zero_point: int, qmin: int, qmax: int, acc_bound,
                          device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """clamp(MBQM(acc) + zp, qmin, qmax) per channel (last dim), as x * R + c floored in float64.

    The two roundings of MBQM nest into one: with M' = M * 2^left and K = 31 + right,
    RDBP(SRDHM(x*2^left, M), right) + zp = floor((x*M' + 2^30 + (2^(right-1) - s)*2^31 + zp*2^K) / 2^K),
    where s = [SRDHM < 0] for gemmlowp's half-away shift and 0 for ruy's half-up one (floor(floor(a/m)+b)/n
    = floor((a+b*m)/(m*n))). The result is monotone in x, so x is first clamped to the window outside which
    the output saturates (found here by bisection on `mbqm_int`); in that window x*M' stays below 2^53 and
    every float64 step (x * M'/2^K, + c, floor) is exact (zp joins c while zp * 2^K fits as well).
    `acc` holds exact integers |acc| <= acc_bound (per channel), in any float dtype. Returns None when
    these conditions fail (the caller keeps the int64 chain): multiplier 0, an accumulator that could
    wrap int32 in x * 2^left, or too wide a window.
    """
    mult, shift = np.atleast_1d(np.asarray(mult, np.int64)), np.atleast_1d(np.asarray(shift, np.int64))
    ch = max(mult.size, shift.size, np.size(ruy), np.size(acc_bound))
    mult, shift = np.broadcast_to(mult, (ch,)), np.broadcast_to(shift, (ch,))
    ruy = np.broadcast_to(np.asarray(ruy, bool), (ch,))
    bound = np.broadcast_to(np.floor(np.asarray(acc_bound, np.float64)), (ch,))
    cols: dict[str, list] = {k: [] for k in ("lo", "hi", "r", "c", "d", "a")}
    clamp_out, fold_zp = False, True
    for m, sh, is_ruy, b in zip(mult.tolist(), shift.tolist(), ruy.tolist(), bound.tolist()):
        left, right = max(sh, 0), max(-sh, 0)
        a = int(b)
        if m <= 0 or (a << left) >= (1 << 31):
            return None

        def f(x, m=m, sh=sh, is_ruy=is_ruy):
            return mbqm_int(x, m, sh, is_ruy) + zero_point

        lo, hi = -a, a
        if f(lo) < qmin:  # saturates low inside [-a, a]: clamp x to the first code >= qmin (or the last below)
            lo = _first(lambda x: f(x) >= qmin, -a, a) if f(a) >= qmin else a
            if f(lo) != qmin:
                lo -= 1
                clamp_out = True
        if f(hi) > qmax:
            hi = _first(lambda x: f(x) > qmax, lo, a) - 1
            if f(hi) != qmax:
                hi += 1
                clamp_out = True
        k = 31 + right
        mp = m << left
        c = (1 << 30) + ((1 << (right - 1 + 31)) if right else 0)
        if max(abs(lo), abs(hi)) * mp + c + (1 << 31) >= _F64_INTS:
            return None
        fold_zp &= max(abs(lo), abs(hi)) * mp + c + (1 << 31) + abs(zero_point) * (1 << k) < _F64_INTS
        cols["lo"].append(lo)
        cols["hi"].append(hi)
        cols["r"].append(math.ldexp(mp, -k))  # exact: an integer times a power of two
        cols["c"].append((c, k))
        gem = not is_ruy and right > 0
        cols["d"].append((1 << 30) // mp)  # SRDHM(x*2^left) < 0 iff x*M' < -2^30 iff x + d <= -1
        cols["a"].append(math.ldexp(1.0, -right) if gem else 0.0)
    dev = torch.device(device)

    def const(vals, dtype=torch.float64):
        return vals[0] if len(set(vals)) == 1 else torch.tensor(vals, dtype=dtype, device=dev)

    def bounds(dtype):  # clamp wants both bounds numbers or both tensors
        lo, hi = cols["lo"], cols["hi"]
        if len(set(lo)) == 1 and len(set(hi)) == 1:
            return float(lo[0]), float(hi[0])
        return (torch.tensor(lo, dtype=dtype, device=dev), torch.tensor(hi, dtype=dtype, device=dev))

    # + zp inside the floor while zp * 2^K stays exact, else one more pass after it (tiny multipliers)
    r = const(cols["r"])
    c = const([math.ldexp(ci + (zero_point << k if fold_zp else 0), -k) for ci, k in cols["c"]])
    zp_after = 0 if fold_zp else zero_point
    lo64, hi64 = bounds(torch.float64)
    lo32, hi32 = bounds(torch.float32)
    f32_ok = all(abs(v) <= (1 << 24) for v in cols["lo"] + cols["hi"])
    a_vals = cols["a"]
    s_term = any(a_vals)
    d, alpha = const(cols["d"]), const(a_vals)

    def run(acc: torch.Tensor) -> torch.Tensor:
        if acc.dtype == torch.float32 and f32_ok:
            x = acc.clamp_(lo32, hi32).to(torch.float64)
        else:
            x = acc.to(torch.float64).clamp_(lo64, hi64)
        if s_term:  # -s = clamp(x + d, -1, 0), weighted 2^31 / 2^K = 2^-right (0 for ruy channels)
            u = (x.clamp(-1, 0) if isinstance(d, int) and d == 0 else (x + d).clamp_(-1, 0))
            u = u.mul_(alpha) if isinstance(alpha, torch.Tensor) else u
        x = x.mul_(r).add_(c)
        if s_term:
            x = x.add_(u) if isinstance(alpha, torch.Tensor) else x.add_(u, alpha=alpha)
        x = x.floor_().add_(zp_after) if zp_after else x.floor_()
        return x.clamp_(qmin, qmax) if clamp_out else x

    return run
