"""The EdgeTPU check against the real compiler: predicted vs actual mapped share and CPU ops, per compiled pair.

A pair is X.tflite (what was fed to edgetpu_compiler) and X_edgetpu.tflite (what it produced) in one folder.
Run from the repo root: .venv/bin/python -m benchmarks.edgetpu_vs_compiler [DIR]   (default: tests/data/coral)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from xqat.edgetpu.compiled import CompilerComparison, compare_with_compiled

_SUFFIX = "_edgetpu.tflite"


def find_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """(model, compiled) for every X_edgetpu.tflite in `folder` whose X.tflite is there too, sorted by name."""
    pairs = []
    for compiled in sorted(Path(folder).glob("*" + _SUFFIX)):
        model = compiled.with_name(compiled.name[: -len(_SUFFIX)] + ".tflite")
        if model.is_file():
            pairs.append((model, compiled))
    return pairs


def _ops(names: tuple[str, ...]) -> str:
    if not names:
        return "none"
    return ", ".join(f"{n.removeprefix('CUSTOM:')} x{k}" if k > 1 else n.removeprefix("CUSTOM:")
                     for n, k in Counter(names).items())


def table(results: list[CompilerComparison]) -> str:
    """Markdown table, one row per pair, then the agreement count."""
    lines = ["| model | ops | predicted mapped | actual mapped | predicted CPU ops | actual CPU ops | agrees |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.num_ops} | {r.predicted_share:.1%} | {r.actual_share:.1%} | "
                     f"{_ops(r.predicted_cpu)} | {_ops(r.actual_cpu)} | {'yes' if r.agrees else '**no**'} |")
    lines.append("")
    lines.append(f"agreement: {sum(r.agrees for r in results)} of {len(results)} pairs "
                 "(same CPU ops in the same order, and the checker says the model compiles)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "coral"),
                    help="folder of X.tflite + X_edgetpu.tflite pairs (default: tests/data/coral)")
    ap.add_argument("-v", "--verbose", action="store_true", help="also print where each TPU segment ends")
    args = ap.parse_args(argv)
    pairs = find_pairs(args.folder)
    if not pairs:
        print(f"no X.tflite + X{_SUFFIX} pairs in {args.folder}", file=sys.stderr)
        return 2
    results = [compare_with_compiled(model, compiled) for model, compiled in pairs]
    print(table(results))
    if args.verbose:
        for r in results:
            print(f"\n{r.name}: {r.report.segment_text()}")
    return 0 if all(r.agrees for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
