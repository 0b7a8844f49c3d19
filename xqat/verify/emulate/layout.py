"""Ops that only pick input codes: TRANSPOSE, SLICE, STRIDED_SLICE, SPLIT, SPLIT_V, GATHER,
RESIZE_NEAREST_NEIGHBOR, DEPTH_TO_SPACE, SPACE_TO_DEPTH, TILE, PACK, UNPACK, and the ones that compare raw
codes: MAXIMUM/MINIMUM, REDUCE_MAX/REDUCE_MIN, ARG_MAX/ARG_MIN. (The converter turns squeeze and expand_dims
into RESHAPE.)

Every output element of the index ops is one element of the input at a position fixed by the op and the
shapes, so each is compiled once into an index map: the op applied (in numpy, with TFLite's own index
arithmetic) to the flat positions 0..n-1 of one sample. Running it is one gather per batch. None of these
kernels requantizes on any backend (rules.py); the codes are copied as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .base import TORCH_DTYPES, Kernel, Op

__all__ = ["index_op", "transpose", "slice_op", "strided_slice", "split", "gather", "resize_nearest",
           "maximum_minimum", "depth_space", "tile", "unpack", "pack", "reduce_extreme", "arg_extreme"]


def _positions(o: Op, i: int = 0) -> np.ndarray:
    """Flat positions of one sample of input i, in the input's shape with batch 1."""
    shape = (1, *o.tin(i).shape[1:])
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def index_op(o: Op, pick: Callable[[np.ndarray], np.ndarray | list[np.ndarray]], data: int = 0) -> Kernel:
    """A kernel that gathers input `data` through `pick(positions)`; a list of maps gives one output per map.
    Each map must keep the batch axis first with size 1 (the batch never mixes) and match its output's shape."""
    maps = pick(_positions(o, data))
    many = isinstance(maps, list)
    maps = maps if many else [maps]
    if len(maps) != len(o.op.outputs):
        raise o.fail(f"the op has {len(o.op.outputs)} outputs, its index arithmetic gives {len(maps)}")
    index = []
    for m, t in zip(maps, o.op.outputs):
        want = tuple(o.model.tensor(t).shape)
        if m.ndim == 0 or m.shape[0] != 1 or tuple(m.shape) != want:
            raise o.fail(f"output '{o.model.tensor(t).name}' has shape {want}, the op's index arithmetic gives "
                         f"{tuple(m.shape)}; only ops that keep the batch axis first can be emulated batch-free")
        index.append((torch.as_tensor(m.reshape(-1), device=o.device), want[1:]))
    dtype = TORCH_DTYPES[o.tout.dtype]

    def run(xs):
        flat = xs[data].reshape(xs[data].shape[0], -1).to(dtype)
        outs = tuple(flat.index_select(1, idx).reshape(-1, *shape) for idx, shape in index)
        return outs if many else outs[0]

    return run


def _const_ints(o: Op, i: int) -> list[int]:
    return [int(v) for v in o.const(o.tin(i)).reshape(-1).tolist()]


def transpose(o: Op) -> Kernel:
    perm = [p % len(o.tin(0).shape) for p in _const_ints(o, 1)]
    return index_op(o, lambda pos: pos.transpose(perm))


def slice_op(o: Op) -> Kernel:
    """SLICE: begin and size per axis; size -1 means to the end."""
    begin, size = _const_ints(o, 1), _const_ints(o, 2)
    shape = o.tin(0).shape
    ends = [shape[d] if s == -1 else b + s for d, (b, s) in enumerate(zip(begin, size))]
    return index_op(o, lambda pos: pos[tuple(slice(b, e) for b, e in zip(begin, ends))])


def strided_slice(o: Op) -> Kernel:
    """STRIDED_SLICE with begin/end/shrink-axis masks and the `offset` option (end relative to begin); Python
    slicing clamps out-of-range bounds the way TFLite's StartForAxis/StopForAxis do."""
    opts = o.op.options
    if opts.get("ellipsisMask", 0) or opts.get("newAxisMask", 0):
        raise o.fail("STRIDED_SLICE with ellipsis or new-axis masks is not emulated")
    begin, end, strides = _const_ints(o, 1), _const_ints(o, 2), _const_ints(o, 3)
    bmask, emask, smask = opts.get("beginMask", 0), opts.get("endMask", 0), opts.get("shrinkAxisMask", 0)
    offset = bool(opts.get("offset", False))
    index: list = []
    for d, (b, e, s) in enumerate(zip(begin, end, strides)):
        if offset:
            e = b + e
        if smask >> d & 1:
            index.append(b)
            continue
        index.append(slice(None if bmask >> d & 1 else b, None if emask >> d & 1 else e, s))
    return index_op(o, lambda pos: pos[tuple(index)])


def split(o: Op) -> Kernel:
    """SPLIT (axis tensor first, equal parts) and SPLIT_V (sizes, one may be -1, then the axis)."""
    if o.op.name == "SPLIT":
        data_i = 1
        rank = len(o.tin(1).shape)
        axis = _const_ints(o, 0)[0] % rank
        n = len(o.op.outputs)
        sizes = [o.tin(data_i).shape[axis] // n] * n
    else:
        data_i = 0
        rank = len(o.tin(0).shape)
        axis = _const_ints(o, 2)[0] % rank
        sizes = _const_ints(o, 1)
        if -1 in sizes:
            sizes[sizes.index(-1)] = o.tin(0).shape[axis] - sum(s for s in sizes if s != -1)
    bounds = np.cumsum(sizes)[:-1]
    return index_op(o, lambda pos: list(np.split(pos, bounds, axis=axis)), data=data_i)


def gather(o: Op) -> Kernel:
    """GATHER with constant indices along a non-batch axis (batch_dims 0)."""
    if int(o.op.options.get("batchDims", 0)) != 0:
        raise o.fail("GATHER with batch_dims != 0 is not emulated")
    rank = len(o.tin(0).shape)
    axis = int(o.op.options.get("axis", 0)) % rank
    if axis == 0:
        raise o.fail("GATHER along the batch axis cannot be emulated batch-free")
    if not o.tin(1).is_constant:
        raise o.fail(f"GATHER indices '{o.tin(1).name}' must be a constant tensor")
    idx = np.asarray(o.tin(1).data, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= o.tin(0).shape[axis]):
        raise o.fail(f"GATHER indices '{o.tin(1).name}' are outside [0, {o.tin(0).shape[axis]})")
    return index_op(o, lambda pos: np.take(pos, idx, axis=axis))


def _nearest_sources(in_size: int, out_size: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    """TFLite's reference ResizeNearestNeighbor source index per output index, in float32 like the C++:
    scale = in/out (or (in-1)/(out-1) with align_corners), src = floor((x + offset) * scale) (rounded half away
    with align_corners), clamped to [0, in-1]."""
    f32 = np.float32
    if align_corners and out_size > 1:
        scale = f32(f32(in_size - 1) / f32(out_size - 1))
    else:
        scale = f32(f32(in_size) / f32(out_size))
    offset = f32(0.5) if half_pixel else f32(0.0)
    v = ((np.arange(out_size).astype(f32) + offset) * scale).astype(f32)
    src = (np.sign(v) * np.floor(np.abs(v) + f32(0.5))) if align_corners else np.floor(v)
    src = np.minimum(src.astype(np.int64), in_size - 1)
    return np.maximum(src, 0) if half_pixel else src


def resize_nearest(o: Op) -> Kernel:
    """RESIZE_NEAREST_NEIGHBOR: every backend runs the same integer copy (rules.py: resize_nearest)."""
    (_, h, w, _), (_, oh, ow, _) = o.tin(0).shape, o.tout.shape
    ac = bool(o.op.options.get("alignCorners", False))
    hp = bool(o.op.options.get("halfPixelCenters", False))
    rows, cols = _nearest_sources(h, oh, ac, hp), _nearest_sources(w, ow, ac, hp)
    return index_op(o, lambda pos: pos[:, rows][:, :, cols])


def maximum_minimum(o: Op) -> Kernel:
    """MAXIMUM / MINIMUM compare the raw codes (with broadcasting); no backend requantizes (the converter
    gives both inputs and the output one scale and zero point)."""
    fn = torch.maximum if o.op.name == "MAXIMUM" else torch.minimum
    dtype = TORCH_DTYPES[o.tout.dtype]
    return lambda xs: fn(xs[0].to(dtype), xs[1].to(dtype))


def depth_space(o: Op) -> Kernel:
    """DEPTH_TO_SPACE / SPACE_TO_DEPTH (NHWC, channel order (row in block, column in block, channel))."""
    b = int(o.op.options.get("blockSize", 0))
    if b < 1:
        raise o.fail("block size must be >= 1")

    def pick(pos):
        _, h, w, c = pos.shape
        if o.op.name == "DEPTH_TO_SPACE":
            co = c // (b * b)
            return pos.reshape(1, h, w, b, b, co).transpose(0, 1, 3, 2, 4, 5).reshape(1, h * b, w * b, co)
        return pos.reshape(1, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5).reshape(1, h // b, w // b,
                                                                                          b * b * c)

    return index_op(o, pick)


def tile(o: Op) -> Kernel:
    multiples = _const_ints(o, 1)
    return index_op(o, lambda pos: np.tile(pos, multiples))


def unpack(o: Op) -> Kernel:
    """UNPACK (tf.unstack): one output per index along `axis`."""
    rank = len(o.tin(0).shape)
    axis = int(o.op.options.get("axis", 0)) % rank
    n = o.tin(0).shape[axis]
    return index_op(o, lambda pos: [np.take(pos, i, axis=axis) for i in range(n)])


def pack(o: Op) -> Kernel:
    """PACK (tf.stack) along a non-batch axis: the codes of every input, unchanged."""
    rank = len(o.tout.shape)
    axis = int(o.op.options.get("axis", 0)) % rank
    if axis == 0:
        raise o.fail("PACK along the batch axis cannot be emulated batch-free")
    dtype = TORCH_DTYPES[o.tout.dtype]
    return lambda xs: torch.stack([x.to(dtype) for x in xs], dim=axis)


def _axes(o: Op, rank: int) -> list[int]:
    axes = sorted({a % rank for a in _const_ints(o, 1)})
    if 0 in axes:
        raise o.fail("reducing over the batch axis cannot be emulated batch-free")
    return axes


def reduce_extreme(o: Op) -> Kernel:
    """REDUCE_MAX / REDUCE_MIN: the largest / smallest code (input and output share scale and zero point)."""
    if o.qp(o.tin(0)) != o.qp(o.tout):
        raise o.fail("input and output quantization differ; int8 REDUCE_MAX/MIN compare codes as they are")
    axes = _axes(o, len(o.tin(0).shape))
    keep = bool(o.op.options.get("keepDims", False))
    fn = torch.amax if o.op.name == "REDUCE_MAX" else torch.amin
    return lambda xs: fn(xs[0], dim=axes, keepdim=keep)


def arg_extreme(o: Op) -> Kernel:
    """ARG_MAX / ARG_MIN along one axis: index of the first largest / smallest code."""
    (axis,) = _axes(o, len(o.tin(0).shape))
    dtype = TORCH_DTYPES[o.tout.dtype]
    if o.op.name == "ARG_MAX":
        return lambda xs: torch.argmax(xs[0], dim=axis).to(dtype)
    return lambda xs: torch.argmin(xs[0], dim=axis).to(dtype)
