"""LSTM / GRU unrolled at prepare time (xqat/torch_side/recurrent.py), Linear on (N, T, F) sequences, attention
and a transformer encoder layer (multi-head attention, LayerNorm, GELU, constants).

Tiny models (hidden 8-12, 6-8 steps, one with a square 8x8 input like the digits rows) prepare, train a few
steps, export strictly full-integer, match the interpreter on the three backends (every tensor within 1 LSB
when each layer is fed the file's inputs), the emulator is bit-exact on every tensor, and the recurrent models
map completely to the EdgeTPU. Conversions are shared by a module-scoped fixture."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xqat
from tests.op_models import train_random
from tests.tflite_oracle import BACKENDS, interpreter
from xqat.tflite.mapping import read_mapping
from xqat.tflite.model import read_tflite
from xqat.torch_side.decomposed import converter_constant
from xqat.verify.interpreter import quantize_input
from xqat.verify.io_match import to_tflite_layout


class LastStep(nn.Module):
    """out[:, -1] of a batch_first LSTM -> Linear (the usual sequence classifier)."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class StackedGRU(nn.Module):
    """Two-layer GRU, h_n[-1] -> Linear."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.GRU(8, 8, num_layers=2, batch_first=True), nn.Linear(8, 10)

    def forward(self, x):
        _, h = self.rnn(x)
        return self.fc(h[-1])


class LstmGru(nn.Module):
    """An LSTM's output sequence feeding a GRU (two stacked recurrent modules), last step -> Linear."""

    def __init__(self):
        super().__init__()
        self.lstm, self.gru, self.fc = nn.LSTM(8, 6, batch_first=True), nn.GRU(6, 4, batch_first=True), nn.Linear(4, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.fc(out[:, -1])


class SequenceOut(nn.Module):
    """The whole output sequence used (its steps concatenated: one range), final c_n as a second output."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        out, (_, c) = self.rnn(x)
        return self.fc(out).flatten(1), c[0]


class SequenceLinear(nn.Module):
    """Linear + ReLU on every step of a (N, T, F) sequence, then flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.proj, self.fc = nn.Linear(8, 16), nn.Linear(6 * 16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.proj(x)).flatten(1))


class Attention(nn.Module):
    """Single-head self-attention core: softmax(q k^T) v (the 1/sqrt(d) folded into q), flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(6 * 8, 10)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.fc((a @ self.v(x)).flatten(1))


class Encoder(nn.Module):
    """A tiny post-norm transformer encoder layer (d=8, 2 heads of 4, T=6 steps): Linear embedding + learned
    positional embedding, q/k/v with the 1/sqrt(d) scale as a constant, head split/merge, residual adds,
    LayerNorm, GELU MLP, mean over time, Linear head."""

    def __init__(self, d: int = 8, heads: int = 2, steps: int = 6):
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(torch.randn(1, steps, d) * 0.1)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        n, t, _ = x.shape
        x = self.embed(x) + self.pos
        q, k, v = (y.reshape(n, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
        a = torch.softmax(q / math.sqrt(q.shape[-1]) @ k.transpose(-2, -1), dim=-1)
        x = self.ln1(x + self.proj((a @ v).transpose(1, 2).reshape(n, t, -1)))
        x = self.ln2(x + self.fc2(self.act(self.fc1(x))))
        return self.head(x.mean(dim=1))


class NormGelu(nn.Module):
    """The functional forms: F.layer_norm without affine parameters, F.gelu's tanh form, x * c, c - x; on a square
    (N, 8, 8) input that a Linear reads first."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = F.gelu(F.layer_norm(self.fc(x), (8,)), approximate="tanh")
        return self.out(1.0 - y * 0.5).flatten(1)


class TorchAttention(nn.Module):
    """nn.MultiheadAttention (2 heads, dropout on the weights), residual, LayerNorm, mean over time."""

    def __init__(self):
        super().__init__()
        self.embed, self.attn = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 10)

    def forward(self, x):
        x = self.embed(x)
        return self.fc(self.ln(x + self.attn(x, x, x)[0]).mean(dim=1))


MODELS = {"lstm": (LastStep, (1, 6, 8)), "gru2": (StackedGRU, (1, 8, 8)), "lstm_gru": (LstmGru, (1, 4, 8)),
          "linear": (SequenceLinear, (1, 6, 8)),
          "attention": (Attention, (1, 6, 8)), "encoder": (Encoder, (1, 6, 8)), "norm_gelu": (NormGelu, (1, 8, 8)),
          "mha": (TorchAttention, (1, 6, 8))}
RECURRENT = ["lstm", "gru2", "lstm_gru"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("seq"), {}
    for name, (factory, shape) in MODELS.items():
        torch.manual_seed(0)
        model = factory().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = train_random(xqat.prepare_qat(model, torch.rand(shape)), shape, lr=1e-2)
            report = xqat.export_tflite(qat, torch.rand(shape), folder / f"{name}.tflite")
        out[name] = (model, qat, folder / f"{name}.tflite", report, shape)
    return out


@pytest.mark.parametrize("name", RECURRENT)
def test_exports_strictly_full_integer_as_elementary_ops(exported, name):
    _, qat, path, report, _ = exported[name]
    assert report.ok and report.all_qparams_equal, report.problems()
    m = read_tflite(path)
    ops = {op.name for op in m.ops}
    assert not [t.name for t in m.tensors if t.dtype == "FLOAT32"]
    assert {"FULLY_CONNECTED", "LOGISTIC", "TANH", "MUL", "ADD"} <= ops
    assert not ops & {"QUANTIZE", "DEQUANTIZE", "GATHER", "UNIDIRECTIONAL_SEQUENCE_LSTM"}
    assert sum(r.kind == "activation" for r in report.tensors) == len(xqat.quant_points(qat))
    # (N, T, F) as in torch, also a square (N, T, T) input (docs/sequence-models.md)
    assert tuple(m.tensors[m.inputs[0]].shape) == MODELS[name][1]
    assert read_mapping(path.read_bytes()).sequence_layout
    fixed = {op.outputs[0]: op.name for op in m.ops if op.name in ("LOGISTIC", "TANH")}
    for idx, op in fixed.items():  # TFLite's fixed output grids
        t = m.tensors[idx]
        assert (float(t.scales[0]), int(t.zero_points[0])) == ((1 / 256, -128) if op == "LOGISTIC" else (1 / 128, 0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_parity_outputs_and_local_layers_within_one_lsb(exported, name, backend):
    _, qat, path, _, shape = exported[name]
    x = torch.rand(16, *shape[1:], generator=torch.Generator().manual_seed(3))
    r = xqat.parity(qat, path, x, backend=backend)
    # end to end, a 1-LSB LOGISTIC/TANH difference of a backend's kernel (the emulator reproduces it) feeds
    # every later step: 2 LSB at the output of the 2-layer GRU on builtin; each op alone is within 1
    assert r.outputs and all(o.max_abs <= 2 for o in r.outputs), r.table()
    local = xqat.parity(qat, path, x, backend=backend, local=True)
    assert local.layers and all(t.max_abs <= 1 for t in local.layers), local.table()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_emulator_is_bit_exact_on_every_tensor(exported, name, backend):
    _, _, path, _, shape = exported[name]
    raw = path.read_bytes()
    it = interpreter(raw, backend, preserve=True, num_threads=1)
    inp = it.get_input_details()[0]
    x = to_tflite_layout(torch.rand(64, *shape[1:], generator=torch.Generator().manual_seed(4)).numpy(), inp["shape"],
                         read_mapping(raw).sequence_layout)
    codes = quantize_input(x, *inp["quantization"], inp["dtype"], backend)
    _, emu_all = xqat.emulate(raw, [torch.from_numpy(codes)], backend=backend, intermediates=True)
    checked = [i for i in sorted(emu_all) if i != inp["index"]]
    assert len(checked) >= 3
    mismatches = 0
    for n in range(len(codes)):
        it.set_tensor(inp["index"], codes[n:n + 1])
        it.invoke()
        mismatches += sum(int((it.get_tensor(i) != emu_all[i][n:n + 1].numpy()).sum()) for i in checked)
    assert mismatches == 0


def test_linear_on_a_sequence_is_one_fully_connected_without_transpose(exported):
    _, qat, path, report, _ = exported["linear"]
    assert report.ok and report.all_qparams_equal and not report.inner_transpose_ops, report.problems()
    m = read_tflite(path)
    assert [op.name for op in m.ops] == ["FULLY_CONNECTED", "RESHAPE", "FULLY_CONNECTED"]
    assert tuple(m.tensors[m.ops[0].inputs[0]].shape) == (1, 6, 8)  # the input as torch has it
    assert tuple(m.tensors[m.ops[0].outputs[0]].shape) == (1, 6, 16)
    assert read_mapping(path.read_bytes()).sequence_layout
    # the EdgeTPU compiler maps FULLY_CONNECTED only with one non-unit output dim: this one stays on the CPU
    assert xqat.check_edgetpu(path).codes("CPU") == {"O3"}


def test_attention_is_batch_matmul_and_softmax_refused_for_the_edgetpu(exported):
    _, qat, path, report, _ = exported["attention"]
    assert report.ok and report.all_qparams_equal and not report.inner_transpose_ops, report.problems()
    ops = [op.name for op in read_tflite(path).ops]
    assert ops.count("BATCH_MATMUL") == 2 and "SOFTMAX" in ops and "TRANSPOSE" not in ops  # k^T: adj_y
    assert "transpose" not in [p.label for p in xqat.quant_points(qat)]  # folded into BATCH_MATMUL: no tensor
    with pytest.raises(xqat.UnsupportedLayerError, match="BATCH_MATMUL"):
        xqat.prepare_qat(Attention().eval(), torch.rand(1, 6, 8), xqat.QATConfig(edgetpu=True))


def test_encoder_layer_exports_strictly_as_int8_ops(exported):
    _, qat, path, report, _ = exported["encoder"]
    assert report.ok and report.all_qparams_equal and not report.inner_transpose_ops, report.problems()
    m = read_tflite(path)
    ops = [op.name for op in m.ops]
    assert not [t.name for t in m.tensors if t.dtype == "FLOAT32"]
    assert ops.count("RSQRT") == 2 and ops.count("GELU") == 1 and ops.count("BATCH_MATMUL") == 2
    assert ops.count("TRANSPOSE") == 4  # q, v (0, 2, 1, 3), k (0, 2, 3, 1), the head merge: copies, same grid
    assert [op.options["approximate"] for op in m.ops if op.name == "GELU"] == [False]
    labels = [p.label for p in xqat.quant_points(qat)]
    assert {"ln1.mean", "ln1.centered", "ln1.square", "ln1.variance", "ln1.rsqrt", "ln1.normalized", "ln1.scaled",
            "ln1.shifted", "act"} <= set(labels)
    assert {"ln1.weight", "ln1.bias", "pos"} <= set(qat.state_dict())  # parameters keep their names
    for op in m.ops:  # every constant operand of ADD/MUL is an int8 tensor the converter quantized
        if op.name in ("ADD", "MUL"):
            assert all(m.tensor(i).dtype == "INT8" for i in op.inputs)


def test_functional_layer_norm_gelu_tanh_and_number_operands(exported):
    _, qat, path, report, _ = exported["norm_gelu"]
    assert report.ok and report.all_qparams_equal and not report.inner_transpose_ops, report.problems()
    m = read_tflite(path)
    assert tuple(m.tensor(m.inputs[0]).shape) == (1, 8, 8) and m.ops[0].name == "FULLY_CONNECTED"  # no TRANSPOSE
    assert [op.options["approximate"] for op in m.ops if op.name == "GELU"] == [True]
    assert "RSQRT" in [op.name for op in m.ops] and "SUB" in [op.name for op in m.ops]
    gamma = [p for p in xqat.quant_points(qat) if ".scaled" in p.label]
    assert not gamma  # no affine parameters: no MUL gamma / ADD beta


def test_layer_norm_gelu_and_fused_attention_refusals():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm((6, 8))

        def forward(self, x):
            return self.ln(x)

    with pytest.raises(xqat.UnsupportedLayerError, match=r"LayerNorm over 2 dims.*last dim"):
        xqat.prepare_qat(Wide(), torch.rand(1, 6, 8))
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out.mean(2) + weights.mean(2)

    with pytest.raises(xqat.UnsupportedLayerError, match=r"'attn'.*MultiheadAttention.*weights.*write the attention"):
        xqat.prepare_qat(Weights(), torch.rand(1, 6, 8))
    with pytest.raises(xqat.UnsupportedLayerError, match=r"GELU.*unknown to compiler 16"):
        xqat.prepare_qat(Encoder().eval(), torch.rand(1, 6, 8), xqat.QATConfig(edgetpu=True))


def test_multihead_attention_is_written_out_on_its_own_parameters(exported):
    model, qat, path, report, _ = exported["mha"]
    assert report.ok and report.all_qparams_equal and not report.inner_transpose_ops, report.problems()
    ops = [op.name for op in read_tflite(path).ops]
    assert ops.count("BATCH_MATMUL") == 2 and "SOFTMAX" in ops
    assert qat.get_submodule("attn.in_proj").linear.weight is qat.get_parameter("attn.in_proj_weight")
    assert {"attn.in_proj_weight", "attn.out_proj.linear.weight"} <= set(qat.state_dict())
    with pytest.raises(xqat.UnsupportedLayerError, match="BATCH_MATMUL"):
        xqat.prepare_qat(TorchAttention().eval(), torch.rand(1, 6, 8), xqat.QATConfig(edgetpu=True))


def test_converter_constant_is_the_converters_grid(exported):
    """A parameter operand trains on the codes the converter stores for it (per tensor over [min(0, w), max(0, w)])."""
    _, qat, path, _, _ = exported["encoder"]
    m = read_tflite(path)
    q = converter_constant(qat.get_parameter("ln1.weight").detach())
    stored = [t for t in m.tensors if t.data is not None and t.dtype == "INT8" and t.data.size == 8
              and np.allclose((t.data.astype(np.float64).reshape(-1) - t.zero_points[0]) * t.scales[0], q.numpy(),
                              atol=1e-6)]
    assert len(stored) == 1


@pytest.mark.parametrize("name", RECURRENT)
def test_every_op_maps_to_the_edgetpu(exported, name):
    r = xqat.check_edgetpu(exported[name][2])
    assert r.fully_mapped, r.table()


def test_unrolled_model_computes_the_recurrent_layer_and_keeps_its_parameter_names(exported):
    model, qat, _, _, shape = exported["lstm"]
    keys = set(qat.state_dict())
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"} <= keys
    fresh = LastStep()
    missing = fresh.load_state_dict(qat.state_dict(), strict=False).missing_keys
    assert missing == ["fc.weight", "fc.bias"]  # QLinear wraps the Linear (fc.linear.*); the LSTM's names stay
    torch.manual_seed(1)
    float_model = LastStep().eval()
    unrolled = xqat.prepare_qat(float_model, torch.rand(shape)).eval()  # no range observed yet: weights quantized
    assert torch.equal(unrolled.get_parameter("rnn.weight_ih_l0"), float_model.rnn.weight_ih_l0)
    x = torch.rand(4, *shape[1:])
    torch.testing.assert_close(unrolled(x), float_model(x), atol=0.02, rtol=0)


def test_an_lstm_feeding_a_gru_unrolls_both_and_computes_them():
    """The GRU reads the LSTM's unrolled output sequence, which must carry the shape the GRU's steps are cut from."""
    torch.manual_seed(2)
    float_model = LstmGru().eval()
    unrolled = xqat.prepare_qat(float_model, torch.rand(MODELS["lstm_gru"][1])).eval()
    assert {"lstm.weight_hh_l0", "gru.weight_hh_l0"} <= set(unrolled.state_dict())
    labels = {p.label for p in xqat.quant_points(unrolled)}
    assert {"lstm.l0_t3_h", "gru.l0_t3_h"} <= labels and not {lb for lb in labels if "_t4_" in lb}
    x = torch.rand(4, *MODELS["lstm_gru"][1][1:])
    torch.testing.assert_close(unrolled(x), float_model(x), atol=0.02, rtol=0)


def test_edgetpu_config_accepts_the_unrolled_layers_and_refuses_a_linear_on_a_sequence():
    for model in (LastStep(), StackedGRU()):
        xqat.prepare_qat(model.eval(), torch.rand(1, 5, 8), xqat.QATConfig(edgetpu=True))
    with pytest.raises(xqat.UnsupportedLayerError, match=r"proj \(Linear\).*Conv1d\(kernel_size=1\)"):
        xqat.prepare_qat(SequenceLinear().eval(), torch.rand(1, 6, 8), xqat.QATConfig(edgetpu=True))


def test_gru_first_step_reset_bias_and_state_roles():
    torch.manual_seed(0)
    qat = xqat.prepare_qat(StackedGRU().eval(), torch.rand(1, 5, 8))
    labels = {p.label: p.role for p in xqat.quant_points(qat)}
    assert labels["rnn.l0_reset_bias_t0"] == "own" and labels["rnn.l1_t4_h"] == "own"
    assert labels["rnn.l0_t0_r"] == "fixed" and labels["rnn.l0_t0_n"] == "fixed"
    assert labels["rnn.l0_t1_hmn"] == "own"  # h - n: SUB


def test_whole_output_sequence_is_concatenated_on_one_grid_and_c_n_is_an_output():
    torch.manual_seed(0)
    qat = xqat.prepare_qat(SequenceOut().eval(), torch.rand(1, 4, 8))
    points = xqat.quant_points(qat)
    steps = [p for p in points if p.label.startswith("rnn.seq_t")]
    assert len(steps) == 4 and len({p.group for p in steps}) == 1
    qat.train()
    out, c = qat(torch.rand(3, 4, 8))
    assert out.shape == (3, 16) and c.shape == (3, 8)


@pytest.mark.parametrize("bad, words", [
    (lambda: nn.LSTM(8, 8, batch_first=True, bidirectional=True), "bidirectional"),
    (lambda: nn.LSTM(8, 8, batch_first=True, proj_size=4), "proj_size"),
    (lambda: nn.GRU(8, 8), "batch_first=True"),
    (lambda: nn.RNN(8, 8, batch_first=True), "nn.GRU or nn.LSTM"),
])
def test_unsupported_recurrent_layers_are_refused_with_a_fix(bad, words):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = bad()

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(xqat.UnsupportedLayerError, match=words):
        xqat.prepare_qat(Net(), torch.rand(1, 4, 8))


def test_checkpoint_round_trip_and_dropout_between_layers(tmp_path):
    torch.manual_seed(0)
    qat = xqat.prepare_qat(LastStep().eval(), torch.rand(1, 6, 8)).train()
    for _ in range(3):
        qat(torch.rand(4, 6, 8))
    xqat.save_qat(qat.eval(), tmp_path / "lstm.pt", input_shape=(1, 6, 8))
    loaded, _ = xqat.load_qat("tests.test_sequence_models:LastStep", tmp_path / "lstm.pt")
    x = torch.rand(5, 6, 8)
    assert torch.equal(loaded.eval()(x), qat(x))

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.LSTM(8, 8, num_layers=2, dropout=0.5, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            _, (h, _) = self.rnn(x)
            return self.fc(h[-1])

    deep = Deep().eval()
    q = xqat.prepare_qat(deep, torch.rand(1, 6, 8))
    assert isinstance(q.get_submodule("rnn.l1_dropout"), nn.Dropout)
    q.train()
    assert not torch.equal(q(x), q(x))  # the dropout between the layers acts in training
    torch.testing.assert_close(q.eval()(x), deep(x), atol=0.02, rtol=0)


def test_encoder_and_multihead_attention_checkpoint_round_trip(tmp_path):
    for name in ("Encoder", "TorchAttention"):
        torch.manual_seed(0)
        factory = {"Encoder": Encoder, "TorchAttention": TorchAttention}[name]
        qat = xqat.prepare_qat(factory().eval(), torch.rand(1, 6, 8)).train()
        for _ in range(3):
            qat(torch.rand(4, 6, 8))
        xqat.save_qat(qat.eval(), tmp_path / f"{name}.pt", input_shape=(1, 6, 8))
        loaded, _ = xqat.load_qat(f"tests.test_sequence_models:{name}", tmp_path / f"{name}.pt")
        x = torch.rand(5, 6, 8)
        assert torch.equal(loaded.eval()(x), qat(x))
