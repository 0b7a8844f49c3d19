#!/usr/bin/env python3
"""Rewrite references to unpublished design notes into pointers at the repository's own docs.

Older comments cite `tf-quant-semantics.md §1.2`, bare `(§4.3)`, `export-route.md "Mechanics"`,
`edgetpu-readiness.md §5`, `../shared/docs/...` and tracker issues ("issue 4"), none of which a person who
clones the repository can open. This script rewrites them, in place, into `docs/numerics.md#anchor`,
`docs/edgetpu.md#anchor` or `docs/why.md`, keeps Python lines within 120 characters (wrapping comments,
docstrings and string literals) and README paragraphs reflowed, and lists whatever it could not fix. It is
idempotent. Run it once on the merged tree, then review the diff:

    python tools/fix_doc_refs.py            # rewrite the tree the script lives in
    python tools/fix_doc_refs.py ROOT       # or another checkout
    python tools/fix_doc_refs.py --check    # only report; exit 1 if any reference is left
    python tools/fix_doc_refs.py --selftest # the worked examples of SELFTEST

It also says which anchors of docs/numerics.md and docs/edgetpu.md it links to that those files lack.

Exit status: 0 when nothing is left to fix by hand, 1 otherwise (the leftovers are printed).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tokenize
from collections.abc import Callable
from pathlib import Path

MAX_LINE = 120
NUMERICS = "docs/numerics.md"
EDGETPU = "docs/edgetpu.md"
WHY = "docs/why.md"

# Anchors of docs/edgetpu.md (written separately; this script only points at them).
EDGETPU_ANCHORS = ("requirements", "op-table", "segment-model", "levels", "compiled-pairs", "torch-layers")

# Files scanned (relative to the root); the docs that are the targets are never rewritten.
SCAN = ("xqat", "tests", "benchmarks", "examples", "tools", "README.md", "docs")
SKIP = {NUMERICS, EDGETPU, WHY, "tools/fix_doc_refs.py"}

# What must be gone afterwards (the check of --check and of the final report).
LEFTOVER = re.compile(r"§|shared/docs|tf-quant-semantics|edgetpu-readiness|export-route\.md|peers-and-user-pain"
                      r"|architecture-sketch|\bissues? #?\d|\bissue \"")


# ------------------------------------------------------------------------------------------------------
# Section -> anchor. A section of the TF numerics notes may need the text around it to pick the anchor.


def _kw(rules: list[tuple[str, str]], default: str, flags=0) -> Callable[[str], str]:
    def pick(context: str) -> str:
        for pattern, anchor in rules:
            if re.search(pattern, context, flags):
                return anchor
        return default
    return pick


_SEC3 = _kw([(r"fold|\bBN\b|freeze|correction|batch stat", "bn-folding"), (r"delay", "quant-delay")], "ema")
_SEC44 = _kw([(r"\bbias", "bias"), (r"LOGISTIC|SOFTMAX|TANH|sigmoid|fixed output|quantization_spec",
                                    "fixed-output-grids"),
              (r"[Ww]eight|symmetric|kernel", "weights"), (r"activation|clamp", "fused-activation"),
              (r"same-scale|concat|requantiz", "same-scale-ops")],
             "weights")
_SEC53 = _kw([(r"8 fractional|qs8/qu8 convert|i8->i8|requantize op", "requantize"),
              (r"QUANTIZE|[Qq]uantize(s|d)? (the )?input|input rule", "quantize"),
              (r"MEAN|global average", "mean"), (r"\bADD\b|vadd", "add"), (r"\bMUL\b", "mul"),
              (r"AVERAGE_POOL|average pool|avg ?pool", "average-pool"), (r"DEQUANTIZE", "dequantize"),
              (r"out-of-image|padd", "conv-fc"), (r"LOGISTIC|TANH|lookup|expf", "lut"),
              (r"SOFTMAX", "softmax"),
              (r"fp32|FULLY_CONNECTED|[Rr]equantiz|clamp", "requantization")], "backends")

NUMERICS_SECTIONS: dict[str, str | Callable[[str], str]] = {
    "1": "fake-quant", "1.1": "fake-quant", "1.2": "nudge", "1.3": "forward", "1.4": "edge-cases",
    "1.5": "gradients", "1.6": "fake-quant",
    "2": "ema", "2.1": _kw([(r"[Ww]eight|LastValue|stale", "weight-ranges")], "ema"), "2.2": "weight-ranges",
    "3": _SEC3,
    "4": "converter", "4.1": "converter-settings", "4.2": "int8-tensors", "4.3": "converter-qparams",
    "4.4": _SEC44,
    "5": "kernels", "5.1": "multiplier", "5.2": "requantization", "5.3": _SEC53,
    "6": "sources", "7": "parity-checklist", "7.4": "snapping", "7.6": "weight-ranges",
}
EDGETPU_SECTIONS = {"0": "requirements", "1": "requirements", "1a": "op-table", "2": "op-table", "3": "levels",
                    "4": "torch-layers", "5": "levels", "6": "requirements", "7": "requirements", "8": "op-table"}
EDGETPU_QUALIFIED = {"P1": "segment-model", "P2": "levels", "F4": "op-table", "F5": "op-table"}

# A whole doc cited without a section.
DOC_TARGETS = {
    "tf-quant-semantics": (NUMERICS, ""),
    "edgetpu-readiness": (EDGETPU, ""),
    "export-route": (NUMERICS, "export-pipeline"),
    "peers-and-user-pain": (WHY, ""),
    "architecture-sketch": ("docs/architecture.md", ""),
}
DOC_QUALIFIED = {'"Mechanics"': "onnx2tf-handlers", '"Converter pitfalls"': "converter-pitfalls"}

# Every anchor of docs/numerics.md the rules above and the overrides below can emit.
NUMERICS_ANCHORS = (
    "fake-quant", "nudge", "forward", "edge-cases", "gradients", "ema", "quant-delay", "weight-ranges",
    "bn-folding", "fixed-output-grids", "converter", "converter-settings", "int8-tensors", "converter-qparams",
    "snapping", "weights", "bias", "fused-activation", "same-scale-ops", "export-pipeline", "onnx2tf-handlers",
    "converter-pitfalls", "kernels", "backends", "multiplier", "requantization", "conv-fc", "add", "mul",
    "average-pool", "mean", "quantize", "requantize", "dequantize", "lut", "softmax", "parity-checklist",
    "sources",
)


def _anchor(spec: str, sec: str, qualifier: str, context: str) -> tuple[str, str]:
    """(doc path, anchor) for section `sec` of `spec` ("tqs" or "etr")."""
    q = qualifier.strip()
    if spec == "etr":
        if q in EDGETPU_QUALIFIED:
            return EDGETPU, EDGETPU_QUALIFIED[q]
        return EDGETPU, EDGETPU_SECTIONS.get(sec, EDGETPU_SECTIONS.get(sec.split(".")[0].rstrip("abc"), ""))
    m = re.fullmatch(r"item (\d+)", q)
    if m and sec == "7":
        sec = f"7.{m.group(1)}"
    target = NUMERICS_SECTIONS.get(sec) or NUMERICS_SECTIONS.get(sec.split(".")[0], "")
    return NUMERICS, (target(context) if callable(target) else target)


# ------------------------------------------------------------------------------------------------------
# Hand-written rewrites for references whose generic rewrite would read badly (matched as substrings,
# wherever they still occur after the merge; anything else goes through the generic rules).

OVERRIDES: list[tuple[str, str]] = [
    # README
    ("(see `../shared/docs/peers-and-user-pain.md`)", "(see [docs/why.md](docs/why.md))"),
    ("(tf.contrib / Jacob et al. §3, correction factors, `freeze_bn_delay`)",
     "(tf.contrib / Jacob et al., correction factors, `freeze_bn_delay`; "
     "[docs/numerics.md](docs/numerics.md#bn-folding))"),
    ("integer rounding (tf-quant-semantics.md §5), different per backend",
     "integer rounding ([docs/numerics.md](docs/numerics.md#kernels)), different per backend"),
    ("Findings\nbeyond the spec's table", "Findings\nbeyond the published kernel descriptions"),
    ("beyond the spec's table", "beyond the published kernel descriptions"),
    ("are documented in\n`xqat/verify/emulate/rules.py`.",
     "are documented in\n[docs/numerics.md](docs/numerics.md#kernels) and `xqat/verify/emulate/rules.py`."),
    ("Architecture: `docs/architecture.md`.",
     "Architecture: `docs/architecture.md`; numerics: `docs/numerics.md`; why xqat: `docs/why.md`."),
    ("the per-op limits of `../shared/docs/edgetpu-readiness.md`",
     "the per-op limits of [docs/edgetpu.md](docs/edgetpu.md#op-table)"),
    # torch_side
    ("Spec: tf-quant-semantics.md §1.2 (nudge) and §4.3 (converter).",
     "Formulas: docs/numerics.md#nudge and docs/numerics.md#converter-qparams."),
    ("Spec: tf-quant-semantics.md §2.1 (tfmot EMA), §3 (tf.contrib zero-debias EMA, quant_delay).",
     "Formulas: docs/numerics.md#ema (tfmot and tf.contrib zero-debias EMA), docs/numerics.md#quant-delay."),
    ("One EMA update from a batch (§2.1 tfmot / §3 contrib zero-debias), skipping non-finite values.",
     "One EMA update from a batch (tfmot / contrib zero-debias, docs/numerics.md#ema), skipping non-finite "
     "values."),
    ("tf.contrib.quantize / Jacob et al. (tf-quant-semantics.md §3).",
     "tf.contrib.quantize / Jacob et al. (docs/numerics.md#bn-folding)."),
    ("BN folded with the moving statistics (§3 eval graph)", "BN folded with the moving statistics, the inference form "
     "of docs/numerics.md#bn-folding"),
    ("LastValueQuantizer without the stale-range trap, §2.1/§7.6)",
     "LastValueQuantizer without the stale-range trap, docs/numerics.md#weight-ranges)"),
    ('Placement rules (issue "QAT on the torch side"; export-route.md):',
     "Placement rules (docs/numerics.md#same-scale-ops, #fixed-output-grids):"),
    ("per tensor for Linear (the converter rejects per-channel FC, export-route.md)",
     "per tensor for Linear (the converter rejects per-channel FC, docs/numerics.md#weights)"),
    ("(export-route.md: TFLite keeps one tensor per op output",
     "(docs/numerics.md#fused-activation: TFLite keeps one tensor per op output"),
    # export
    ("Quantize Linear weights per tensor (export-route.md)",
     "Quantize Linear weights per tensor (docs/numerics.md#weights)"),
    ("(tf-quant-semantics.md §4.1, export-route.md \"Converter pitfalls\")",
     "(docs/numerics.md#converter-settings, #converter-pitfalls)"),
    ("# §4.4: float32 of the product of the converter's *double* scales",
     "# docs/numerics.md#bias: float32 of the product of the converter's *double* scales"),
    ("export-route.md, steps 1-2.", "docs/numerics.md#export-pipeline."),
    # verify
    ("(tf-quant-semantics §4.4, §5)", "(docs/numerics.md#kernels)"),
    ("simd = rule == \"simd16_int16wrap\"  # builtin: single-rounding input scaling (§5.3), int16 packing",
     "simd = rule == \"simd16_int16wrap\"  # builtin: single-rounding input scaling (numerics.md#add), int16 "
     "packing"),
    ('"""gemmlowp SaturatingRoundingDoublingHighMul (§5.2), i.e. (a*b + nudge) / 2^31 truncated.',
     '"""gemmlowp SaturatingRoundingDoublingHighMul, i.e. (a*b + nudge) / 2^31 truncated '
     '(docs/numerics.md#requantization).'),
    ('"""gemmlowp RoundingDivideByPOT (§5.2): arithmetic shift right, rounding half away from zero.',
     '"""gemmlowp RoundingDivideByPOT: arithmetic shift right, rounding half away from zero '
     '(docs/numerics.md#requantization).'),
    ('"""ruy\'s x86 AVX requantization (§5.2): r = (x*2^left*M + 2^30) >> 31, then (r + 2^(e-1)) >> e.',
     '"""ruy\'s x86 AVX requantization (docs/numerics.md#requantization):\n'
     '    r = (x*2^left*M + 2^30) >> 31, then (r + 2^(e-1)) >> e.'),
    ('"""TFLITE_SINGLE_ROUNDING MultiplyByQuantizedMultiplier (§5.2): (x*M + 2^(30-shift)) >> (31-shift)."""',
     '"""TFLITE_SINGLE_ROUNDING MBQM (docs/numerics.md#requantization): (x*M + 2^(30-shift)) >> (31-shift)."""'),
    ('"""XNNPACK "fp32" requantization (§5.3): float32(acc) * scale, clamp to [qmin-zp, qmax-zp], round half',
     '"""XNNPACK "fp32" requantization (docs/numerics.md#requantization): float32(acc) * scale, clamp to\n'
     '    [qmin-zp, qmax-zp], round half'),
    ('"""TFLite reference FULLY_CONNECTED (§5.3): round_half_away(double(acc) * double multiplier)."""',
     '"""TFLite reference FULLY_CONNECTED: round_half_away(double(acc) * double multiplier) '
     '(docs/numerics.md#requantization)."""'),
    ('"""TFLite QuantizeMultiplier (§5.1): m = q * 2^shift with q an int32 in [2^30, 2^31), elementwise.',
     '"""TFLite QuantizeMultiplier, elementwise: m = q * 2^shift with q an int32 in [2^30, 2^31) '
     '(docs/numerics.md#multiplier).'),
    ('"""Integer clamp of a fused activation (§4.4): TFLite rounds f/s half away, XNNPACK lrintf(f/s + zp)."""',
     '"""Integer clamp of a fused activation (docs/numerics.md#fused-activation): TFLite rounds f/s half away,\n'
     '    XNNPACK lrintf(f/s + zp)."""'),
    ('"""§1.3 in TF\'s op order, each step a separately rounded float32 op (in place after the clamp)."""',
     '"""TF\'s op order, each step a separately rounded float32 op, in place after the clamp '
     '(docs/numerics.md#forward)."""'),
    # tests
    ("# the spec's example of a split zero point", "# docs/numerics.md#converter-qparams example"),
    ("# The backend choice matters, exactly where the spec says (§5.2, §5.3)",
     "# The backend choice matters, exactly where docs/numerics.md#backends says"),
    ("# the spec's rule, computed independently", "# the documented rule, computed independently"),
    ("# Rounding primitives against the spec's scalar formulas (§5.1, §5.2)",
     "# Rounding primitives against the scalar formulas of docs/numerics.md#multiplier, #requantization"),
]

# Tracker references: dropped (the text around them says what is tested).
ISSUE_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\s*\((?:GitHub )?issues? #?\d+(?:\s*(?:[-–,]|and)\s*#?\d+)*(?: item \d+)?\)"), ""),
    (re.compile(r"\(issues? \"[^\"]*\";\s*"), "("),
    (re.compile(r"\s*\(issues? \"[^\"]*\"\)"), ""),
    (re.compile(r",? (?:see |cf\. )?issues? #?\d+(?:\s*[-–]\s*#?\d+)?(?: item \d+)?(?=[,;.)]|$)"), ""),
    (re.compile(r" (?:of|from|in|for|by) issues? #?\d+(?:\s*[-–]\s*#?\d+)?(?: item \d+)?\b"), ""),
]

_DOC = (r"`?(?:\.\./)?(?:shared/docs/)?(?P<doc>tf-quant-semantics|edgetpu-readiness|export-route|peers-and-user-pain"
        r"|architecture-sketch)(?:\.md)?`?(?P<docq>,? steps? \d+(?:-\d+)?| \"Mechanics\"| \"Converter pitfalls\")?")
_SEC = (r"(?:(?:the )?spec(?:'s)? )?§ ?(?P<sec>\d+(?:\.\d+)?[a-z]?)"
        r"(?P<secq> item \d+| notes| [FTOP]\d+\b| requirement \d+| \"PyTorch-side rules\"| int8 vs uint8"
        r"| (?:Conv2d|Softmax|Mean|Memory|Batch)\b| Resize\*?)?")
_TOKEN = re.compile(f"(?P<docref>{_DOC})|(?P<secref>{_SEC})")
_SEPARATOR = re.compile(r"^(?:,\s*|/|\s+and\s+|;\s*|\s+)$")


def _link(doc: str, anchor: str, short: bool, markdown: bool, md_dir: str) -> str:
    target = f"{doc}#{anchor}" if anchor else doc
    if markdown:
        rel = target if not md_dir else target.removeprefix(md_dir + "/")
        return f"[{target}]({rel})"
    return f"#{anchor}" if short and anchor else target


def rewrite_line(line: str, default_spec: str, markdown: bool, md_dir: str) -> str:
    """Generic rewrite of one line: doc names and § numbers -> links; issue references dropped."""
    out, pos, spec = [], 0, default_spec
    last: tuple[str, str] | None = None  # (doc, anchor) of the link just before, if the last token was one
    matches = list(_TOKEN.finditer(line))
    for i, m in enumerate(matches):
        gap = line[pos:m.start()]
        if m.group("docref"):
            name = m.group("doc")
            spec = {"tf-quant-semantics": "tqs", "edgetpu-readiness": "etr"}.get(name, spec)
            nxt = matches[i + 1] if i + 1 < len(matches) else None
            if (nxt is not None and nxt.group("secref") and not m.group("docq")
                    and re.fullmatch(r",?\s*", line[m.end():nxt.start()])):
                out.append(gap)  # the sections that follow carry the link
                pos, last = nxt.start(), None
                continue
            doc, anchor = DOC_TARGETS[name]
            anchor = DOC_QUALIFIED.get((m.group("docq") or "").strip(), anchor)
            link = _link(doc, anchor, False, markdown, md_dir)
        else:
            doc, anchor = _anchor(spec, m.group("sec"), m.group("secq") or "", line)
            same_cluster = last is not None and bool(_SEPARATOR.match(gap))
            if same_cluster and last == (doc, anchor):
                pos = m.end()  # "§2.1/§7.6" that land on one anchor: keep one link
                continue
            link = _link(doc, anchor, same_cluster and last[0] == doc, markdown, md_dir)
        out.append(gap)
        out.append(link)
        last = (doc, anchor)
        pos = m.end()
    out.append(line[pos:])
    text = "".join(out)
    for pattern, repl in ISSUE_PATTERNS:
        text = pattern.sub(repl, text)
    text = re.sub(r"\bSpec: (?=docs/)", "See ", text)
    return text


# ------------------------------------------------------------------------------------------------------
# Keeping Python lines within MAX_LINE: wrap comments and docstrings at a space.


class _Layout:
    """Where comments, docstrings and bracketed one-line strings are in a Python source."""

    def __init__(self, src: str) -> None:
        self.comments: dict[int, int] = {}  # line -> column of its comment
        self.docstrings: dict[int, tuple[int, int]] = {}  # line -> (first, last) line of its docstring
        self.strings: dict[int, list[tuple[int, int, bool]]] = {}  # line -> [(start, end, inside brackets)
        # of its one-line string literals], which may be split into two adjacent literals
        prev, depth = tokenize.NEWLINE, 0
        try:
            for tok in tokenize.generate_tokens(io.StringIO(src).readline):
                if tok.type == tokenize.OP and tok.string in "([{":
                    depth += 1
                elif tok.type == tokenize.OP and tok.string in ")]}":
                    depth -= 1
                elif tok.type == tokenize.COMMENT:
                    self.comments[tok.start[0]] = tok.start[1]
                elif tok.type == tokenize.STRING:
                    triple = tok.string.lstrip("rbufRBUF")[:3] in ('"""', "'''")
                    if triple and depth == 0 and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                                          tokenize.NL):
                        for row in range(tok.start[0], tok.end[0] + 1):
                            self.docstrings[row] = (tok.start[0], tok.end[0])
                    elif not triple and tok.start[0] == tok.end[0]:
                        self.strings.setdefault(tok.start[0], []).append((tok.start[1], tok.end[1], depth > 0))
                if tok.type not in (tokenize.COMMENT, tokenize.NL):
                    prev = tok.type
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass


def _split_at_space(text: str, limit: int, outside_code: bool = False) -> tuple[str, str] | None:
    cut = text.rfind(" ", 0, limit + 1)
    while outside_code and cut > 0 and text[:cut].count("`") % 2:  # not inside `inline code`
        cut = text.rfind(" ", 0, cut)
    while cut > 0 and text[cut - 1] == " ":
        cut -= 1
    if cut <= len(text) - len(text.lstrip()) or cut < 0:
        return None
    return text[:cut].rstrip(), text[cut:].strip()


def _split_string(line: str, start: int, end: int, bracketed: bool) -> tuple[str, str] | None:
    """Split the literal line[start:end] at a space into two adjacent literals on two lines (in new
    parentheses unless it already sits inside brackets)."""
    if not bracketed:
        line, start, end = line[:start] + "(" + line[start:end] + ")" + line[end:], start + 1, end + 1
    lit = line[start:end]
    prefix = lit[: len(lit) - len(lit.lstrip("rbufRBUF"))]
    quote = lit[len(prefix)]
    body = lit[len(prefix) + 1:-1]
    is_f = "f" in prefix.lower()
    best = None
    for k in range(len(body) - 1, 0, -1):
        if body[k] != " " or start + len(prefix) + k + 3 > MAX_LINE:
            continue
        head = body[:k + 1]
        if is_f and (head.count("{") - head.count("{{") * 2) != (head.count("}") - head.count("}}") * 2):
            continue  # inside a replacement field
        best = k
        break
    if best is None:
        return None
    head, tail = body[:best + 1], body[best + 1:]

    def pre(part: str) -> str:
        return prefix if not is_f or "{" in part else prefix.replace("f", "").replace("F", "")

    first = line[:start] + pre(head) + quote + head + quote
    second = " " * start + pre(tail) + quote + tail + quote + line[end:]
    return first, second


def wrap_python(src: str, original: str) -> tuple[str, list[int]]:
    """Wrap lines longer than MAX_LINE that the rewrite made long (comments, docstrings, bracketed strings);
    returns the new source and the lines it could not wrap."""
    was_long = {s for s in original.split("\n") if len(s) > MAX_LINE}
    lines = src.split("\n")
    failed: set[str] = set()
    for _ in range(500):
        long = [i for i, s in enumerate(lines) if len(s) > MAX_LINE and s not in was_long and s not in failed]
        if not long:
            break
        layout = _Layout("\n".join(lines))
        i = long[0]
        row, line = i + 1, lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        new = _wrap_one(lines, i, row, line, indent, layout)
        if new is None:
            failed.add(line)
            continue
        lines[i:i + new[0]] = new[1]
    rows = [n for n, s in enumerate(lines, 1) if s in failed]
    return "\n".join(lines), rows


def _wrap_one(lines: list[str], i: int, row: int, line: str, indent: str,
              layout: _Layout) -> tuple[int, list[str]] | None:
    """(how many lines to replace at i, their replacement), or None."""
    nxt = lines[i + 1] if i + 1 < len(lines) else None
    if row in layout.comments:
        col = layout.comments[row]
        code, comment = line[:col].rstrip(), line[col:]
        if code:  # an inline comment moves above its line
            return 1, [indent + comment, code]
        rule = re.search(r"\s*([-=])\1{4,}$", line)  # a "# -- title -----" rule line: shorten the rule
        if rule and len(line) - MAX_LINE <= len(rule.group(0)) - 4:
            return 1, [line[:MAX_LINE].rstrip()]
        parts = _split_at_space(line, MAX_LINE)
        if parts is None or not comment.lstrip("#").strip():
            return None
        head, rest = parts
        nxt_text = nxt.strip().lstrip("#").strip() if nxt is not None else ""
        if (nxt is not None and layout.comments.get(row + 1) == col and nxt.strip().startswith("#")
                and nxt_text[:1] not in ("-", "*", "") and not re.search(r"[.:;]$", rest)):
            return 2, [head, f"{indent}# {rest} {nxt_text}"]
        return 1, [head, f"{indent}# {rest}"]
    if row in layout.docstrings:
        _, last = layout.docstrings[row]
        parts = _split_at_space(line, MAX_LINE)
        if parts is None:
            return None
        head, rest = parts
        joinable = (nxt is not None and row + 1 <= last and nxt.strip()
                    and nxt[: len(nxt) - len(nxt.lstrip())] == indent
                    and not nxt.strip().startswith(("-", "*", '"""', "'''", ">>>"))
                    and not re.search(r"[.:;]$", rest))
        if joinable:
            return 2, [head, f"{indent}{rest} {nxt.strip()}"]
        return 1, [head, f"{indent}{rest}"]
    for start, end, bracketed in sorted(layout.strings.get(row, []), reverse=True):
        if start < MAX_LINE - 4:
            split = _split_string(line, start, end, bracketed)
            if split is not None:
                return 1, list(split)
    return None


def wrap_markdown(text: str, original: str) -> str:
    """Reflow paragraph lines that the rewrite made longer than MAX_LINE (tables, headings, code stay)."""
    was_long = {s for s in original.split("\n") if len(s) > MAX_LINE}
    lines = text.split("\n")
    fenced, i = False, 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        plain = not fenced and not re.match(r"\s*(\||#|```)", line)
        long = plain and len(line) > MAX_LINE and line not in was_long
        parts = _split_at_space(line, MAX_LINE, outside_code=True) if long else None
        if parts is None:
            i += 1
            continue
        head, rest = parts
        indent = line[: len(line) - len(line.lstrip())]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt.strip() and not re.match(r"\s*(\||#|```|[-*+] |\d+\. |>)", nxt):
            lines[i:i + 2] = [head, f"{indent}{rest} {nxt.strip()}"]
        else:
            lines[i:i + 1] = [head, f"{indent}{rest}"]
        i += 1
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    out: list[Path] = []
    for name in SCAN:
        p = root / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix in (".py", ".md") and q.is_file()
                              and ".venv" not in q.parts and "__pycache__" not in q.parts))
    return [p for p in out if p.relative_to(root).as_posix() not in SKIP]


def _default_spec(rel: str) -> str:
    return "etr" if "edgetpu" in rel else "tqs"


def fix_text(text: str, rel: str) -> tuple[str, list[int]]:
    """The rewritten text of one file, and its line numbers still too long (Python only)."""
    original = text
    for old, new in OVERRIDES:
        text = text.replace(old, new)
    markdown = rel.endswith(".md")
    md_dir = str(Path(rel).parent.as_posix()) if markdown and "/" in rel else ""
    old_lines = text.split("\n")
    new_lines = [rewrite_line(s, _default_spec(rel), markdown, md_dir) if LEFTOVER.search(s) else s
                 for s in old_lines]
    text = "\n".join(new_lines)
    if rel.endswith(".py"):
        before = text
        text, failed = wrap_python(text, original)
        if text != before:
            try:
                compile(text, rel, "exec")
            except SyntaxError as e:  # never leave a file broken: keep the unwrapped rewrite
                return before, [e.lineno or 0]
        return text, failed
    return wrap_markdown(text, original), []


def _check_anchors(root: Path) -> list[str]:
    """Anchors the script emits that the target docs (where present) do not define."""
    problems = []
    for doc, anchors in ((NUMERICS, _numerics_anchors()), (EDGETPU, set(EDGETPU_ANCHORS))):
        path = root / doc
        if not path.exists():
            problems.append(f"{doc} does not exist yet; links into it point at: {sorted(anchors)}")
            continue
        defined = _defined_anchors(path.read_text(encoding="utf-8"))
        missing = sorted(a for a in anchors if a not in defined)
        if missing:
            problems.append(f"{doc} lacks anchors {missing}")
    return problems


def _numerics_anchors() -> set[str]:
    return set(NUMERICS_ANCHORS)


def _defined_anchors(md: str) -> set[str]:
    found = set(re.findall(r'<a (?:id|name)="([^"]+)"', md))
    for m in re.finditer(r"^#+\s+(.*?)\s*$", md, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        found.add(slug)
    found |= set(re.findall(r"\{#([\w-]+)\}", md))
    return found


SELFTEST = [  # (file, line, expected rewrite)
    ("xqat/a.py", "# nudge (tf-quant-semantics.md §1.2), converter (§4.3)",
     "# nudge (docs/numerics.md#nudge), converter (docs/numerics.md#converter-qparams)"),
    ("xqat/a.py", "x  # see §1.2, §4.3 and §7 item 4",
     "x  # see docs/numerics.md#nudge, #converter-qparams and #snapping"),
    ("xqat/a.py", "# -- EMA modes (§2.1, §3) --", "# -- EMA modes (docs/numerics.md#ema) --"),
    ("xqat/a.py", "# the §3 fold, frozen", "# the docs/numerics.md#bn-folding fold, frozen"),
    ("xqat/a.py", '"""x (export-route.md "Mechanics")."""', '"""x (docs/numerics.md#onnx2tf-handlers)."""'),
    ("xqat/edgetpu/b.py", "# one segment (§5 P1); limits (§1a Softmax)",
     "# one segment (docs/edgetpu.md#segment-model); limits (docs/edgetpu.md#op-table)"),
    ("tests/t.py", '"""Export (issue 4)."""', '"""Export."""'),
    ("tests/t.py", '"""Export (issues 2-9): x."""', '"""Export: x."""'),
    ("tests/t.py", "# what the probe of issue 14 covers", "# what the probe covers"),
    ("README.md", "see `../shared/docs/edgetpu-readiness.md` now", "see [docs/edgetpu.md](docs/edgetpu.md) now"),
    ("xqat/a.py", "# MEAN rounds (§5.3) here", "# MEAN rounds (docs/numerics.md#mean) here"),
]


def selftest() -> int:
    bad = 0
    for rel, line, want in SELFTEST:
        got = rewrite_line(line, _default_spec(rel), rel.endswith(".md"), "")
        if got != want:
            bad += 1
            print(f"selftest FAILED for {line!r}:\n  got  {got!r}\n  want {want!r}")
    src = "def f():\n    " + '"""' + "word " * 30 + "(tf-quant-semantics.md §1.2) and more words here." + '"""' + "\n"
    out, failed = fix_text(src, "xqat/w.py")
    if failed or max(map(len, out.split("\n"))) > MAX_LINE or LEFTOVER.search(out):
        bad += 1
        print(f"selftest FAILED: docstring wrap\n{out}")
    compile(out, "w.py", "exec")
    print(f"selftest: {len(SELFTEST) + 1 - bad} of {len(SELFTEST) + 1} passed")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--check", action="store_true", help="change nothing; report what is left")
    ap.add_argument("--selftest", action="store_true", help="run the built-in examples and exit")
    args = ap.parse_args(argv)
    if args.selftest:
        return selftest()
    root = Path(args.root).resolve()
    leftovers: list[str] = []
    changed_files = 0
    for path in _files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        new, too_long = (text, []) if args.check else fix_text(text, rel)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed_files += 1
        for n, s in enumerate(new.split("\n"), 1):
            if LEFTOVER.search(s):
                leftovers.append(f"{rel}:{n}: reference left: {s.strip()}")
        for n in too_long:
            leftovers.append(f"{rel}:{n}: longer than {MAX_LINE} characters after the rewrite; wrap it by hand")
    for p in _check_anchors(root):
        print(f"note: {p}")
    if not args.check:
        print(f"rewrote {changed_files} files")
    for s in leftovers:
        print(s)
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
