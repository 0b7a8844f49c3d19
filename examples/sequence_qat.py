"""LSTM, GRU and transformer sequence classifiers on the bundled digits read row by row (8 steps of 8 features):
float -> QAT -> full-integer TFLite -> parity -> EdgeTPU check, one result row per model (docs/sequence-models.md).

    python examples/sequence_qat.py [--models lstm,gru,transformer] [--hidden 32] [--epochs 30] [--qat-epochs 6]
                                    [--out-dir seq_models]
"""
import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import xqat
from xqat.demo.data import digits
from xqat.demo.training import accuracy, fit


class RowClassifier(nn.Module):
    """A recurrent layer over the 8 image rows; its last hidden state -> 10 classes."""

    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU], hidden: int) -> None:
        super().__init__()
        self.rnn = cell(8, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 8 steps, 8 features)
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class EncoderClassifier(nn.Module):
    """A one-layer pre-norm transformer over the 8 image rows: Linear embedding + learned positional embedding,
    multi-head self-attention (scale 1/sqrt(d_head) as a constant), GELU MLP, LayerNorms, mean over the rows,
    Linear head. Written out so every op is visible; it exports as int8 TFLite ops (docs/sequence-models.md)."""

    def __init__(self, d: int = 32, heads: int = 2, steps: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(torch.zeros(1, steps, d))
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 8 steps, 8 features)
        n, t, _ = x.shape
        x = self.embed(x) + self.pos
        q, k, v = (y.reshape(n, t, self.heads, -1).transpose(1, 2) for y in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        attn = torch.softmax(q * (1.0 / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(n, t, -1))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.head(self.norm(x).mean(dim=1))


MODELS = {"lstm": ("LSTM({})", lambda h: RowClassifier(nn.LSTM, h), 1e-2),  # title, factory(hidden), float lr
          "gru": ("GRU({})", lambda h: RowClassifier(nn.GRU, h), 1e-2),
          "transformer": ("Transformer(d={}, 2 heads)", lambda h: EncoderClassifier(d=h), 3e-3)}


def run(name: str, args, data, out_dir: Path) -> dict:
    title, factory, lr = MODELS[name]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = fit(factory(args.hidden), data["x_train"], data["y_train"], epochs=args.epochs, lr=lr)
    qat = xqat.prepare_qat(model, data["x_train"][:1])
    fit(qat, data["x_train"], data["y_train"], epochs=args.qat_epochs, lr=1e-3)
    path = out_dir / f"digits_rows_{name}_int8.tflite"
    report = xqat.export_tflite(qat, data["x_train"][:1], path)
    test = [(data["x_test"], data["y_test"])]
    int8 = xqat.evaluate(path, test).value  # the integer emulator, bit-exact with the interpreter
    p = xqat.parity(qat, path, data["x_test"])
    local = xqat.parity(qat, path, data["x_test"][:64], local=True)
    tpu = xqat.check_edgetpu(path)
    return {"model": title.format(args.hidden), "float": accuracy(model, data["x_test"], data["y_test"]),
            "qat": accuracy(qat, data["x_test"], data["y_test"]), "int8": int8,
            "agreement": p.outputs[0].top1_agreement, "output_lsb": p.outputs[0].max_abs,
            "local_lsb": max(t.max_abs for t in local.layers), "strict": report.ok and report.all_qparams_equal,
            "ops": len(report.ops), "edgetpu": f"{100 * tpu.mapped_op_share:.0f}%", "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lstm,gru,transformer", help="comma-separated: lstm, gru, transformer")
    ap.add_argument("--hidden", type=int, default=32, help="hidden size (LSTM/GRU), model width d (transformer)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--out-dir", default="seq_models")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = digits(size=8)
    data = {k: (v.squeeze(1) if k.startswith("x") else v) for k, v in split._asdict().items()}  # (N, 8 rows, 8)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    rows = [run(name, args, data, out_dir) for name in names]
    cols = ["model", "float", "qat", "int8", "agreement", "output_lsb", "local_lsb", "strict", "ops", "edgetpu",
            "seconds"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
