"""Coverage of real architectures (torchvision, timm, detection/segmentation heads, Conv1d) at several input
sizes: prepare -> train 3 steps -> strict export -> parity and emulator on three backends -> EdgeTPU check.
Writes the table to docs/model-zoo.md (random init, 10 classes; nothing is downloaded).

Run from the repo root: .venv/bin/python -m benchmarks.model_zoo [--sizes 64x64,32x32,48x80] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.real_models import ZOO
from tests.zoo_check import BACKENDS, ZooResult, check_model

DOC = Path(__file__).resolve().parent.parent / "docs" / "model-zoo.md"

# Architectures that cannot become a full-integer int8 TFLite model, and why (not run).
OUT_OF_SCOPE = {
    "vision transformers (ViT, DeiT, Swin), ConvNeXt": "not run in this CNN table; their pieces (multi-head "
    "attention, LayerNorm, GELU) export full-integer in the transformer of docs/sequence-models.md",
    "detection post-processing (anchor decoding, NMS)": "stays in float post-processing on the CPU, as on Coral; "
    "the backbone and head are in the table",
}


# Why the failing entries fail (found with the export report and local parity; see the closing notes of the work).
KNOWN_CAUSES: dict[str, str] = {}


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def _cell(r: ZooResult) -> str:
    if not r.ok:
        return f"✗ {r.stage}"
    worst = min(r.identical.values())
    top1 = [v for v in r.top1.values() if v is not None]
    return f"✓ {100 * worst:.0f}%" + (f", top-1 {100 * min(top1):.0f}%" if top1 else "")


def _detail_rows(results: list[ZooResult]) -> list[str]:
    rows = []
    for r in results:
        ident = " / ".join(f"{100 * r.identical[b]:.1f}%" for b in BACKENDS if b in r.identical) or "-"
        top1 = " / ".join("-" if r.top1.get(b) is None else f"{100 * r.top1[b]:.0f}%"
                          for b in BACKENDS if b in r.top1) or "-"
        emu = "exact" if r.emulator_exact and all(r.emulator_exact.values()) else (
            "-" if not r.emulator_exact else "MISMATCH")
        tpu = "-" if r.edgetpu_mapped is None else f"{100 * r.edgetpu_mapped:.0f}%"
        tpu += f" (edgetpu=True: {r.edgetpu_export})" if r.edgetpu_export else ""
        status = "ok" if r.ok else f"fails at {r.stage}: {r.error}"
        max_abs = max(r.max_abs.values()) if r.max_abs else "-"
        rows.append(f"| {r.model} | {status} | {ident} | {max_abs} | {top1} | {emu} | {_exact_cell(r)} | {tpu} |")
    return rows


def _exact_cell(r: ZooResult) -> str:
    """Exact numerics per backend: "✓" when every tensor's codes are identical, else the least identical share."""
    if r.exact_error:
        return f"refused: {r.exact_error}"
    if not r.exact:
        return "-"
    return " / ".join(("✓" if r.exact[b] == 1.0 else f"{100 * r.exact[b]:.1f}%") for b in BACKENDS if b in r.exact)


def write_doc(results: dict[tuple[int, int], list[ZooResult]], seconds: float) -> str:
    sizes = list(results)
    names = [z.name for z in ZOO if any(r.model == z.name for rs in results.values() for r in rs)]
    by = {(s, r.model): r for s, rs in results.items() for r in rs}
    lines = [
        "# Model zoo: real architectures through the whole chain",
        "",
        "Each model: random init, 10 classes, `prepare_qat` -> 3 training steps -> `export_tflite` (strict: every "
        "scale, zero point and weight code equal, full-integer) -> `parity` on xnnpack / builtin / reference "
        "(output codes identical; top-1 agreement for classifiers; 8 random inputs) -> integer emulator vs "
        "interpreter (bit-exact on every backend) -> exact numerics (`xqat.set_numerics(qat, backend)`, layerwise "
        "parity: ✓ when every tensor's codes are identical, else the least identical share) -> `check_edgetpu` "
        "(share of ops in the TPU segment). "
        "EdgeTPU-friendly families also export with `edgetpu=True`.",
        "",
        f"Command: `.venv/bin/python -m benchmarks.model_zoo` ({platform.machine()}, {os.cpu_count()} cores, "
        f"{seconds / 60:.0f} min). Parity with the default `\"tf\"` numerics drifts in deep nets by design: the "
        "float simulation and the integer kernels round differently at every layer and the differences compound; "
        "`QATConfig(numerics=backend)` computes the device's integers instead "
        "(docs/numerics.md#exact-training-numerics). Rows come from several runs (merged with `--merge`); runs "
        "before the int32 bias was simulated (2026-12-02) show more drift than the code has now. The exact-numerics "
        "column shows \"-\" for runs made before that stage existed; `tests/test_model_zoo.py` asserts it (every "
        "tensor identical on all three backends) for every model in CI.",
        "",
        "## Coverage by input size",
        "",
        "| model | " + " | ".join(f"{h}×{w}" for h, w in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_cell(by[s, name]) if (s, name) in by else "not run"
                                                   for s in sizes) + " |")
    lines += ["", "✓ = exported strictly, parity and emulator ran; the percentage is the worst backend's share "
              "of identical output codes. ✗ = the stage that failed (details below).", ""]
    for s in sizes:
        lines += [f"## Details at {s[0]}×{s[1]}", "",
                  "| model | result | output identical (xnnpack / builtin / reference) | max abs Δ | top-1 agreement "
                  "| emulator | exact numerics: every tensor identical (xnnpack / builtin / reference) "
                  "| EdgeTPU mapped |", "|---|---|---|---|---|---|---|---|"]
        lines += _detail_rows(results[s]) + [""]
    lines += _sequence_section()
    if KNOWN_CAUSES:
        lines += ["## Known causes of the failures", ""] + [f"- **{k}**: {v}" for k, v in KNOWN_CAUSES.items()] + [""]
    lines += ["## Out of scope", ""] + [f"- **{k}**: {v}" for k, v in OUT_OF_SCOPE.items()] + [""]
    return "\n".join(lines)


def _sequence_section() -> list[str]:
    """The digits sequence classifiers (LSTM, GRU, transformer): the results table of docs/sequence-models.md, which
    `examples/sequence_qat.py` measures (trained for real, so not rerun here)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "sequence-models.md").read_text()
    after = text.split("## Results: digits read row by row", 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|"))
    table = after[start:start + next((i for i, line in enumerate(after[start:]) if not line.startswith("|")),
                                     len(after) - start)]
    return ["## Sequence models: digits read row by row", "",
            "Trained on scikit-learn's digits (8 rows of 8 pixels as 8 steps of 8 features; 359 test images), "
            "measured by `python examples/sequence_qat.py`; details and design in "
            "[docs/sequence-models.md](sequence-models.md).", "", *table, ""]


def _load(paths: list[str]) -> tuple[dict[tuple[int, int], list[ZooResult]], float]:
    """Results saved by --save, grouped by size in model order; total seconds of the runs. A model run at the
    same size in several files keeps the result of the last file given (a rerun replaces the old result)."""
    latest: dict[tuple[tuple[int, int], str], ZooResult] = {}
    seconds = 0.0
    for p in paths:
        data = json.loads(Path(p).read_text())
        seconds += data["seconds"]
        for r in data["results"]:
            r["size"] = tuple(r["size"])
            latest[r["size"], r["model"]] = ZooResult(**r)
    results: dict[tuple[int, int], list[ZooResult]] = {}
    for (size, _), r in latest.items():
        results.setdefault(size, []).append(r)
    names = [z.name for z in ZOO]
    return {s: sorted(rs, key=lambda r: names.index(r.model)) for s, rs in results.items()}, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64x64,32x32,48x80")
    ap.add_argument("--only", nargs="*", help="model names (default: all)")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print the table, do not write docs/model-zoo.md")
    ap.add_argument("--save", help="also save the raw results as JSON here (to split a long run over processes)")
    ap.add_argument("--merge", nargs="*", help="write the doc from saved JSON results instead of running")
    args = ap.parse_args()
    if args.merge:
        results, seconds = _load(args.merge)
        DOC.write_text(write_doc(results, seconds))
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    models = [z for z in ZOO if not args.only or z.name in args.only]
    sizes = [_size(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    results: dict[tuple[int, int], list[ZooResult]] = {s: [] for s in sizes}
    with tempfile.TemporaryDirectory() as d:
        for s in sizes:
            for z in models:
                r = check_model(z, s, d, n_inputs=args.inputs)
                results[s].append(r)
                if args.save:  # after every model, so a cut-short run keeps what it measured
                    Path(args.save).write_text(json.dumps({"seconds": time.perf_counter() - t0, "results": [
                        dataclasses.asdict(r) for rs in results.values() for r in rs]}))
                print(f"{s[0]}x{s[1]} {z.name}: {'ok' if r.ok else r.stage + ': ' + r.error}", file=sys.stderr,
                      flush=True)
    doc = write_doc(results, time.perf_counter() - t0)
    print(doc)
    if not args.no_write:
        DOC.write_text(doc)


if __name__ == "__main__":
    main()
