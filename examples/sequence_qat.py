"""LSTM and GRU sequence classifiers on the bundled digits read row by row (8 steps of 8 features):
float -> QAT -> full-integer TFLite -> parity -> EdgeTPU check, one result row per model (docs/sequence-models.md).

    python examples/sequence_qat.py [--hidden 32] [--epochs 30] [--qat-epochs 6] [--out-dir seq_models]
"""
import argparse
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


def run(cell, args, data, out_dir: Path) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = fit(RowClassifier(cell, args.hidden), data["x_train"], data["y_train"], epochs=args.epochs, lr=1e-2)
    qat = xqat.prepare_qat(model, data["x_train"][:1])
    fit(qat, data["x_train"], data["y_train"], epochs=args.qat_epochs, lr=1e-3)
    path = out_dir / f"digits_rows_{cell.__name__.lower()}_int8.tflite"
    report = xqat.export_tflite(qat, data["x_train"][:1], path)
    test = [(data["x_test"], data["y_test"])]
    int8 = xqat.evaluate(path, test).value  # the integer emulator, bit-exact with the interpreter
    p = xqat.parity(qat, path, data["x_test"])
    local = xqat.parity(qat, path, data["x_test"][:64], local=True)
    tpu = xqat.check_edgetpu(path)
    return {"model": f"{cell.__name__}({args.hidden})", "float": accuracy(model, data["x_test"], data["y_test"]),
            "qat": accuracy(qat, data["x_test"], data["y_test"]), "int8": int8,
            "agreement": p.outputs[0].top1_agreement, "output_lsb": p.outputs[0].max_abs,
            "local_lsb": max(t.max_abs for t in local.layers), "strict": report.ok and report.all_qparams_equal,
            "ops": len(report.ops), "edgetpu": f"{100 * tpu.mapped_op_share:.0f}%", "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--out-dir", default="seq_models")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = digits(size=8)
    data = {k: (v.squeeze(1) if k.startswith("x") else v) for k, v in split._asdict().items()}  # (N, 8 rows, 8)
    rows = [run(cell, args, data, out_dir) for cell in (nn.LSTM, nn.GRU)]
    cols = ["model", "float", "qat", "int8", "agreement", "output_lsb", "local_lsb", "strict", "ops", "edgetpu",
            "seconds"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
