"""Run a whole .tflite graph with the integer kernels of one backend, batched (docs/numerics.md).

The model is parsed and every op compiled once (`Emulator`); `run` then walks the ops in file order
(TFLite stores them topologically sorted) on N samples at a time, where the interpreter runs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ...errors import EmulationError, TFLiteFileError
from ...tflite.model import TFLiteModel, read_tflite
from ...tflite.validate import validate_model
from ..backends import check_backend
from .kernels import TORCH_DTYPES, build

__all__ = ["Emulator"]

TensorLike = torch.Tensor | np.ndarray

# Elements of the largest tensor of one CPU pass: 2^20 values (4-8 MB) stay in the L3 cache,
# and allocations that size are reused by malloc instead of being mapped (page faults) on every call.
_PASS_ELEMENTS = 1 << 20


class Emulator:
    """A .tflite model compiled into torch integer kernels for one backend, ready to run batches.

    backend: "reference" (BUILTIN_REF kernels), "builtin" (optimized kernels without delegates) or
    "xnnpack" (the interpreter's default: XNNPACK delegate, builtin kernels for the ops it leaves).
    num_threads: the interpreter's num_threads (None there means 1); the optimized int8 MEAN splits its
    channels over threads, and its rounding follows the split. samples_per_pass: samples per pass
    through the graph (default: cache-sized on CPU, the whole batch on CUDA); any value gives the same results.
    """

    def __init__(self, model: str | Path | bytes | TFLiteModel, backend: str = "xnnpack",
                 device: str | torch.device = "cpu", samples_per_pass: int | None = None, num_threads: int = 1):
        check_backend(backend)
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (the interpreter's thread count), got {num_threads}")
        self.num_threads = int(num_threads)
        try:  # what the runtime would refuse, the emulator refuses too (the one validator's message)
            self.model = validate_model(model if isinstance(model, TFLiteModel) else read_tflite(model),
                                        runnable=True)
        except TFLiteFileError as e:
            raise EmulationError(str(e)) from e
        self.backend = backend
        self.device = torch.device(device)
        if self.model.num_subgraphs != 1:
            raise EmulationError(f"{self.model.source}: {self.model.num_subgraphs} subgraphs; the emulator "
                                 "runs single-subgraph models only")
        self._kernels = [(op, build(op, self.model, backend, self.device, self.num_threads))
                         for op in self.model.ops]
        self._constants: dict[int, torch.Tensor] = {}
        # tensors without the batch dim (a Linear's (T, F) rows of a batch-1 sequence model): kept as (N, T, F)
        self._batchless = {t: tuple(self.model.tensor(t).shape) for op in self.model.ops for t in op.outputs
                           if len(self.model.tensor(t).shape) > 1 and self.model.tensor(t).shape[0] != 1}
        last: dict[int, int] = {}
        for pos, op in enumerate(self.model.ops):
            for t in op.inputs:
                last[t] = pos
        keep = set(self.model.outputs)
        self._free_after = [[t for t, p in last.items() if p == pos and t not in keep]
                            for pos in range(len(self.model.ops))]
        per_sample = max((int(np.prod(self.model.tensor(t).shape[1:])) for op in self.model.ops
                          for t in (*op.inputs, *op.outputs) if t >= 0), default=1)
        if samples_per_pass is None:  # CPU: passes whose largest tensor stays cache-sized (see `run`)
            samples_per_pass = max(1, _PASS_ELEMENTS // per_sample) if self.device.type == "cpu" else 1 << 30
        if samples_per_pass < 1:
            raise ValueError(f"samples_per_pass must be >= 1, got {samples_per_pass}")
        self.samples_per_pass = int(samples_per_pass)

    def __repr__(self) -> str:
        return (f"Emulator({self.model.source!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"num_threads={self.num_threads})")

    def _check_inputs(self, inputs: TensorLike | Sequence[TensorLike]) -> list[torch.Tensor]:
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            inputs = [inputs]
        inputs = list(inputs)
        if len(inputs) != len(self.model.inputs):
            raise EmulationError(f"{self.model.source}: the model has {len(self.model.inputs)} inputs, got "
                                 f"{len(inputs)} tensors")
        out = []
        for x, idx in zip(inputs, self.model.inputs):
            t = self.model.tensor(idx)
            want = TORCH_DTYPES.get(t.dtype)
            x = torch.as_tensor(x)
            if x.dtype != want:
                raise EmulationError(f"input '{t.name}' must be {want} (the model's {t.dtype} input, batched "
                                     f"along dim 0), got {x.dtype}; quantize it with the input's scale and "
                                     "zero point first, or pass the raw integer codes")
            if x.dim() != len(t.shape) or tuple(x.shape[1:]) != tuple(t.shape[1:]):
                dims = ", ".join(map(str, t.shape[1:]))
                raise EmulationError(f"input '{t.name}' must have shape (N, {dims}) (TFLite layout, any N), "
                                     f"got {tuple(x.shape)}")
            out.append(x.to(self.device))
        return out

    def _constant(self, idx: int) -> torch.Tensor:
        if idx not in self._constants:
            t = self.model.tensor(idx)
            self._constants[idx] = torch.as_tensor(np.array(t.data)).to(self.device)
        return self._constants[idx]

    @torch.no_grad()
    def run(self, inputs: TensorLike | Sequence[TensorLike], intermediates: bool = False):
        """Outputs (list, model output order) for a batch of inputs; with intermediates=True also a dict
        tflite tensor index -> tensor for every tensor computed (inputs included).

        The batch goes through the graph `samples_per_pass` samples at a time: every op is elementwise
        along the batch, so the results are the same, and on CPU the intermediates then stay in cache.
        """
        xs = self._check_inputs(inputs)
        n, step = xs[0].shape[0], self.samples_per_pass
        if any(x.shape[0] != n for x in xs):
            raise EmulationError(f"{self.model.source}: the inputs have different batch sizes "
                                 f"{[x.shape[0] for x in xs]}")
        if n <= step:
            return self._run(xs, intermediates)
        passes = [self._run([x[i:i + step] for x in xs], intermediates) for i in range(0, n, step)]
        if not intermediates:
            return [torch.cat(outs) for outs in zip(*passes)]
        outputs = [torch.cat(outs) for outs in zip(*(p[0] for p in passes))]
        return outputs, {t: torch.cat([p[1][t] for p in passes]) for t in passes[0][1]}

    def _run(self, xs: list[torch.Tensor], intermediates: bool):
        env: dict[int, torch.Tensor] = dict(zip(self.model.inputs, xs))
        for pos, (op, kernel) in enumerate(self._kernels):
            args = []
            for t in op.inputs:
                if t < 0:
                    args.append(None)
                elif t in env:
                    args.append(env[t])
                elif self.model.tensor(t).is_constant:
                    args.append(self._constant(t))
                else:
                    raise EmulationError(f"op #{op.index} {op.name} reads tensor {t} "
                                         f"('{self.model.tensor(t).name}') before any op writes it")
            out = kernel(args)  # a tuple for ops with several outputs (SPLIT)
            if op.outputs[0] in self._batchless and not isinstance(out, tuple):
                out = out.reshape(-1, *self._batchless[op.outputs[0]])
            env.update(zip(op.outputs, out) if isinstance(out, tuple) else [(op.outputs[0], out)])
            if not intermediates:
                for t in self._free_after[pos]:
                    env.pop(t, None)
        outputs = [env[t] for t in self.model.outputs]
        return (outputs, env) if intermediates else outputs

    __call__ = run
