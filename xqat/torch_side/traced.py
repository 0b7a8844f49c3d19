"""The torch.compile form of xqat's modules: helpers that let one graph replace Python branches on module state.

Under torch.compile a QAT model runs its "traced" code paths (no host syncs, no Python branches on tensor state);
these helpers keep that code exact: a select whose gradient equals an `if`'s, buffer writes that AOTAutograd cannot
confuse with the values its backward saved, and CUDA settings that keep conv/matmul results fixed.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["compiling", "exact_cuda_math", "select", "write_state"]


def compiling() -> bool:
    """True while torch.compile traces: xqat's code then takes its graph form (tensor conditions instead of
    Python branches on state, no host syncs, no numpy, no warnings), with the same numerics as eager."""
    return torch.compiler.is_compiling()


@contextlib.contextmanager
def exact_cuda_math():
    """On CUDA, no TF32 and no benchmark-picked or nondeterministic cuDNN algorithms: they change conv/matmul
    results, and with them the fake-quant codes. Restores the caller's settings afterwards."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic)
    matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved


class _Select(torch.autograd.Function):
    """torch.where(cond, a, b) whose gradient uses -0.0 as the zero: -0.0 + v == v for every v (also v = -0.0),
    so when autograd adds the two branches' gradients the result is bit for bit the gradient of the taken branch,
    as if the branch had been an `if`."""

    @staticmethod
    def forward(ctx, cond, a, b):
        ctx.save_for_backward(cond)
        return torch.where(cond, a, b)

    @staticmethod
    def backward(ctx, grad):
        (cond,) = ctx.saved_tensors
        neg_zero = torch.full((), -0.0, dtype=grad.dtype, device=grad.device)
        return None, torch.where(cond, grad, neg_zero), torch.where(cond, neg_zero, grad)


def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` where `cond` else `b`, with gradients bit-identical to an `if` on `cond`: how the torch.compile path of
    a QAT model turns a data-dependent branch (quant_delay, not yet observed) into graph code."""
    return _Select.apply(cond, a, b)


def write_state(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Store a new value of a state tensor in the torch.compile form. A buffer is rebound, never written in place:
    AOTAutograd may keep a graph input for the backward instead of a value computed from it, and an in-place update
    of that input would then change the gradients. A Parameter (a learned range) is updated in place."""
    current = getattr(module, name)
    if isinstance(current, torch.nn.Parameter):
        with torch.no_grad():
            current.copy_(value)
    else:
        setattr(module, name, value)
