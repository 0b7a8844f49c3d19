"""nn.LSTM / nn.GRU unrolled at prepare time into the elementary ops the int8 TFLite graph runs per time step:
FULLY_CONNECTED (x W_ih, h W_hh), SPLIT into gates, LOGISTIC / TANH (fixed grids), MUL, ADD, SUB.

Every tensor of the unrolled cell is an ordinary fake-quant point with a range of its own per time step (each
of these ops requantizes its output in TFLite, so no grid has to be shared across steps; a step's gates and
states get the range they actually have there). The one place TFLite needs a common grid is an output
sequence that is used as a whole: its steps are concatenated, which ties every step's h to one range. The
cell state is int8 like every other tensor (docs/sequence-models.md measures what that costs).

The recurrent module is replaced by an `UnrolledRecurrent` holding the same nn.Parameter objects under the
same names (`weight_ih_l0`, `bias_hh_l0`, ...), so `qat.load_state_dict(float_model.state_dict(),
strict=False)` loads them; the per-step layers are parameter-free `GateLinear` views of those parameters.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..errors import UnsupportedLayerError

__all__ = ["RECURRENT", "recurrent_problem", "unroll", "UnrolledRecurrent", "GateLinear"]

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)  # what patterns.py recognises; nn.RNN is refused with a fix
_GATES = {"LSTM": 4, "GRU": 3}


def recurrent_problem(m: nn.Module, node: fx.Node) -> str:
    """Why this LSTM/GRU call cannot be unrolled ('' if it can)."""
    if isinstance(m, nn.RNN):
        return "nn.RNN (Elman) is not unrolled by xqat; use nn.GRU or nn.LSTM"
    if m.bidirectional:
        return "bidirectional recurrent layers are not unrolled by xqat; use two unidirectional layers"
    if getattr(m, "proj_size", 0):
        return "LSTM with proj_size is not unrolled by xqat"
    if not m.batch_first:
        return ("a time-major recurrent layer (batch_first=False) puts time on dim 0, where xqat and TFLite keep the "
                "batch; build it with batch_first=True and feed (N, T, F)")
    if len(node.args) > 1 or node.kwargs:
        return "an explicit initial state (h0 / c0) is not supported: call it on the sequence alone (zero state)"
    x = node.args[0]
    meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    if meta is None or len(meta.shape) != 3:
        return "the input must be a 3-D sequence (batch_first: (N, T, F), else (T, N, F)); unbatched is not supported"
    return ""


class UnrolledRecurrent(nn.Module):
    """Holds an LSTM's/GRU's parameters under their own names, and the per-step `GateLinear` views of them."""

    def __init__(self, rnn: nn.LSTM | nn.GRU) -> None:
        super().__init__()
        self.mode, self.hidden_size, self.num_layers = rnn.mode, rnn.hidden_size, rnn.num_layers
        self.batch_first, self.has_bias, self.dropout = rnn.batch_first, rnn.bias, rnn.dropout
        for name, p in rnn.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def extra_repr(self) -> str:
        return f"{self.mode}, hidden={self.hidden_size}, layers={self.num_layers}, unrolled"

    def forward(self, *args):
        raise RuntimeError("UnrolledRecurrent is a parameter holder; its graph runs the unrolled steps")

    def bias(self, kind: str, layer: int, gates: slice | None = None) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        b = getattr(self, f"bias_{kind}_l{layer}")
        if gates is None:
            return b
        keep = torch.zeros_like(b)
        keep[gates] = 1.0
        return b * keep


class GateLinear(nn.Linear):
    """A parameter-free nn.Linear whose weight and bias are computed from an `UnrolledRecurrent`'s parameters:
    - "ih": x W_ih + b_ih + (the part of b_hh that is added outside any gate product: all of it for LSTM, the
      r and z gates for GRU);
    - "hh": h W_hh (+ b_hn for GRU, which the reset gate multiplies);
    - "reset_bias": r * b_hn as a FULLY_CONNECTED with the diagonal weight diag(b_hn) (GRU's first step, h = 0).
    """

    def __init__(self, owner: UnrolledRecurrent, layer: int, role: str) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the parameters stay registered once
        self.layer, self.role = layer, role
        self.in_features, self.out_features = int(self.weight.shape[1]), int(self.weight.shape[0])

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        o, layer = self._owner, self.layer
        if self.role == "reset_bias":
            return torch.diag(o.bias("hh", layer)[2 * o.hidden_size:])
        return getattr(o, f"weight_{self.role}_l{layer}")

    @property
    def bias(self) -> torch.Tensor:  # type: ignore[override]
        """Always a tensor (zeros where the step adds none): a bias-free linear leaves torch.onnx as
        Transpose + MatMul instead of the Gemm that becomes FULLY_CONNECTED."""
        o, layer, h = self._owner, self.layer, self._owner.hidden_size
        if self.role == "reset_bias" or not o.has_bias or (o.mode == "LSTM" and self.role == "hh"):
            return self.weight.new_zeros(self.out_features)
        if o.mode == "LSTM":
            return o.bias("ih", layer) + o.bias("hh", layer)
        if self.role == "ih":
            return o.bias("ih", layer) + o.bias("hh", layer, slice(0, 2 * h))
        return o.bias("hh", layer, slice(2 * h, 3 * h))

    def extra_repr(self) -> str:
        return f"{self.role} of layer {self.layer}, in={self.in_features}, out={self.out_features}"


class _Builder:
    """Emits the unrolled nodes before the recurrent node, with readable labels `<path>.l<k>_t<t>_<role>`."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, owner: UnrolledRecurrent) -> None:
        self.gm, self.node, self.owner, self.path = gm, node, owner, str(node.target)
        self.stack = {"nn_module_stack": node.meta.get("nn_module_stack", {})}

    def _tag(self, n: fx.Node, name: str) -> fx.Node:
        n.meta = dict(self.stack)
        n.meta["xqat_label"] = f"{self.path}.{name}"
        n.meta["xqat_functional"] = name
        return n

    def call(self, fn, args: tuple, name: str) -> fx.Node:
        return self._tag(self.gm.graph.call_function(fn, args), name)

    def method(self, m: str, args: tuple, name: str) -> fx.Node:
        return self._tag(self.gm.graph.call_method(m, args), name)

    def linear(self, x: fx.Node, layer: int, role: str, name: str) -> fx.Node:
        sub = f"l{layer}_{role}_{name}"
        self.owner.add_module(sub, GateLinear(self.owner, layer, role))
        n = self.gm.graph.call_module(f"{self.path}.{sub}", (x,))
        n.meta = dict(self.stack)
        return n

    def gates(self, x: fx.Node, n: int, name: str) -> list[fx.Node]:
        """The n gate blocks of a (N, n * hidden) pre-activation, as static slices (STRIDED_SLICE each; torch's
        chunk exports its bounds through Shape arithmetic that onnx2tf can get wrong)."""
        h = self.owner.hidden_size
        return [self.call(operator.getitem, (x, (slice(None), slice(i * h, (i + 1) * h))), f"{name}_{i}")
                for i in range(n)]


def _lstm_step(b: _Builder, x: fx.Node, h: fx.Node | None, c: fx.Node | None, layer: int, t: int):
    s = f"l{layer}_t{t}"
    pre = b.linear(x, layer, "ih", f"t{t}")
    if h is not None:
        pre = b.call(operator.add, (pre, b.linear(h, layer, "hh", f"t{t}")), f"{s}_gates")
    gi, gf, gg, go = b.gates(pre, 4, f"{s}_gate")
    i = b.call(torch.sigmoid, (gi,), f"{s}_i")
    g = b.call(torch.tanh, (gg,), f"{s}_g")
    o = b.call(torch.sigmoid, (go,), f"{s}_o")
    ig = b.call(operator.mul, (i, g), f"{s}_ig")
    if c is None:
        c_new = ig
    else:
        f = b.call(torch.sigmoid, (gf,), f"{s}_f")
        c_new = b.call(operator.add, (b.call(operator.mul, (f, c), f"{s}_fc"), ig), f"{s}_c")
    h_new = b.call(operator.mul, (o, b.call(torch.tanh, (c_new,), f"{s}_tanh_c")), f"{s}_h")
    return h_new, c_new


def _gru_step(b: _Builder, x: fx.Node, h: fx.Node | None, c, layer: int, t: int):
    s = f"l{layer}_t{t}"
    xr, xz, xn = b.gates(b.linear(x, layer, "ih", f"t{t}"), 3, f"{s}_xgate")
    if h is None:  # h = 0: r * (h W_hn + b_hn) = r * b_hn
        r = b.call(torch.sigmoid, (xr,), f"{s}_r")
        z = b.call(torch.sigmoid, (xz,), f"{s}_z")
        pre_n = xn if not b.owner.has_bias else \
            b.call(operator.add, (xn, b.linear(r, layer, "reset_bias", f"t{t}")), f"{s}_npre")
        n = b.call(torch.tanh, (pre_n,), f"{s}_n")
        return b.call(operator.sub, (n, b.call(operator.mul, (z, n), f"{s}_zn")), f"{s}_h"), None
    hr, hz, hn = b.gates(b.linear(h, layer, "hh", f"t{t}"), 3, f"{s}_hgate")
    r = b.call(torch.sigmoid, (b.call(operator.add, (xr, hr), f"{s}_rpre"),), f"{s}_r")
    z = b.call(torch.sigmoid, (b.call(operator.add, (xz, hz), f"{s}_zpre"),), f"{s}_z")
    pre_n = b.call(operator.add, (xn, b.call(operator.mul, (r, hn), f"{s}_rh")), f"{s}_npre")
    n = b.call(torch.tanh, (pre_n,), f"{s}_n")
    dh = b.call(operator.mul, (z, b.call(operator.sub, (h, n), f"{s}_hmn")), f"{s}_zd")
    return b.call(operator.add, (n, dh), f"{s}_h"), None


def unroll(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace the LSTM/GRU call `node` (checked by `recurrent_problem`) by its unrolled steps, and its users
    (output sequence, h_n, c_n and their indexing) by the unrolled tensors."""
    rnn = gm.get_submodule(node.target)
    owner = UnrolledRecurrent(rnn)
    parent, _, name = str(node.target).rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, owner)
    x = node.args[0]
    steps = int(x.meta["tensor_meta"].shape[1 if rnn.batch_first else 0])
    b = _Builder(gm, node, owner)
    step = _lstm_step if rnn.mode == "LSTM" else _gru_step
    last_h, last_c, seq = [], [], []
    with gm.graph.inserting_before(node):
        xs = [b.method("flatten", (b.call(operator.getitem, (x, _time_index(rnn.batch_first, t)), f"x_t{t}"), 1),
                       f"x_t{t}_view") if rnn.batch_first else
              b.method("squeeze", (b.call(operator.getitem, (x, slice(t, t + 1)), f"x_t{t}"), 0), f"x_t{t}_view")
              for t in range(steps)]
        for layer in range(rnn.num_layers):
            if layer and rnn.dropout:
                drop = f"l{layer}_dropout"
                owner.add_module(drop, nn.Dropout(rnn.dropout))
                xs = [_module_call(b, f"{b.path}.{drop}", xt) for xt in xs]
            h = c = None
            seq = []
            for t in range(steps):
                h, c = step(b, xs[t], h, c, layer, t)
                seq.append(h)
            last_h.append(h)
            last_c.append(c)
            xs = seq
        _rewire(b, node, rnn, seq, last_h, last_c)


def _time_index(batch_first: bool, t: int) -> tuple:
    return (slice(None), slice(t, t + 1)) if batch_first else (slice(t, t + 1),)


def _module_call(b: _Builder, path: str, x: fx.Node) -> fx.Node:
    n = b.gm.graph.call_module(path, (x,))
    n.meta = dict(b.stack)
    return n


def _is_last_step(index, steps: int, batch_first: bool) -> bool:
    """`out[:, -1]` (batch_first) / `out[-1]`: the last step's h."""
    last = (-1, steps - 1)
    if batch_first:
        return isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and index[1] in last
    return index in last or (isinstance(index, tuple) and len(index) == 1 and index[0] in last)


def _rewire(b: _Builder, node: fx.Node, rnn, seq: list[fx.Node], last_h: list[fx.Node], last_c: list) -> None:
    """Point every use of the recurrent call's (output, h_n[, c_n]) at the unrolled tensors."""
    steps, layers = len(seq), rnn.num_layers
    for user in list(node.users):
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            raise UnsupportedLayerError(f"'{b.path}' ({rnn.mode}): its result is used as {user.op} {user.target}; "
                                        "unpack it as `out, state = rnn(x)` and index those")
        if user.args[1] == 0:
            _rewire_sequence(b, user, rnn, seq, steps)
        elif rnn.mode == "LSTM":
            for sub in list(user.users):
                if not (sub.op == "call_function" and sub.target is operator.getitem and sub.args[1] in (0, 1)):
                    raise UnsupportedLayerError(f"'{b.path}' (LSTM): its state is used as {sub.op} {sub.target}; "
                                                "unpack it as `out, (h_n, c_n) = lstm(x)`")
                _rewire_state(b, sub, last_h if sub.args[1] == 0 else last_c, layers, "h" if sub.args[1] == 0
                              else "c")
        else:
            _rewire_state(b, user, last_h, layers, "h")


def _rewire_sequence(b: _Builder, user: fx.Node, rnn, seq: list[fx.Node], steps: int) -> None:
    for idx in [u for u in list(user.users) if u.op == "call_function" and u.target is operator.getitem
                and _is_last_step(u.args[1], steps, rnn.batch_first)]:
        _replace(idx, seq[-1])
    if user.users:
        dim = 1 if rnn.batch_first else 0
        with b.gm.graph.inserting_before(user):
            parts = [b.method("unsqueeze", (h, dim), f"seq_t{t}") for t, h in enumerate(seq)]
            _replace(user, b.call(torch.cat, (parts, dim), "output"))


def _rewire_state(b: _Builder, user: fx.Node, last: list[fx.Node], layers: int, name: str) -> None:
    for idx in [u for u in list(user.users) if u.op == "call_function" and u.target is operator.getitem
                and u.args[1] in (-1, layers - 1)]:
        _replace(idx, last[-1])
    if user.users:
        with b.gm.graph.inserting_before(user):
            parts = [b.method("unsqueeze", (t, 0), f"{name}_n_l{k}") for k, t in enumerate(last)]
            _replace(user, b.call(torch.cat, (parts, 0), f"{name}_n"))


def _replace(old: fx.Node, new: fx.Node) -> None:
    """`old`'s users read `new` instead. `new` is the same tensor, so it takes `old`'s recorded shape: a later
    rewrite in the same pass (a second LSTM/GRU fed by this one's output) reads it before shapes are run again."""
    if "tensor_meta" in old.meta and "tensor_meta" not in new.meta:
        new.meta["tensor_meta"] = old.meta["tensor_meta"]
    old.replace_all_uses_with(new)
