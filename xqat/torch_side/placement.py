"""Where the fake-quant points go and which ones share a range: the plan `prepare_qat` builds node by node
(`Plan`), then installs as one `ActivationQuantizer` per range group and a `QuantPoint` after each anchor."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from torch import fx, nn

from ..errors import UnsupportedLayerError
from .config import QATConfig
from .modules import WeightQuantizedModule
from .patterns import FOLDED, OpKind, describe, module_path
from .quantizers import FIXED_RANGES, ActivationQuantizer, QuantPoint

__all__ = ["POINTS", "QUANTIZERS", "Role", "Plan", "install_points", "label"]

POINTS = "xqat_points"
QUANTIZERS = "xqat_quantizers"


class Role(StrEnum):
    """How a point uses its range group: observes it, uses it, is already on its grid, or has a fixed grid."""

    OWN = "own"
    TIED = "tied"
    PASS = "pass"
    FIXED = "fixed"


@dataclass
class Point:
    """A planned quantization point: after `anchor`, in range group `slot`."""

    anchor: fx.Node
    slot: int
    label: str  # module path of the op whose output it quantizes
    kind: OpKind
    observe: bool = True
    passthrough: bool = False
    fixed: str = ""
    pool_divisor: int = 0  # unpadded average pool: pixels per output (TFLite's rounding is simulated)


class Slots:
    """Union-find over range slots: tied tensors end up in one group with one quantizer."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class Plan:
    """Planning state shared by the op handlers: kinds, skips, points, range groups and the problems found."""

    gm: fx.GraphModule
    config: QATConfig
    kinds: dict[fx.Node, tuple[OpKind, str]]
    skipped: set[fx.Node]
    slots: Slots = field(default_factory=Slots)
    points: list[Point] = field(default_factory=list)
    slot_of: dict[fx.Node, int] = field(default_factory=dict)
    consumed: set[fx.Node] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def kind(self, node: fx.Node | None) -> OpKind | None:
        if node is None or node in self.skipped:
            return None
        return self.kinds.get(node, (None,))[0]

    def is_identity(self, node: fx.Node | None) -> bool:
        """An identity in eval at every shape (Dropout, Identity, DropPath), not an op folded at this shape."""
        return self.kind(node) is OpKind.PASS_THROUGH and self.kinds[node][1] != FOLDED

    def add_point(self, anchor: fx.Node, kind: OpKind, slot: int | None = None, observe: bool = True,
                  passthrough: bool = False, fixed: str = "", pool_divisor: int = 0) -> int:
        slot = self.slots.new() if slot is None else slot
        self.points.append(Point(self._after_pass_through(anchor), slot, label(self.gm, anchor), kind, observe,
                                 passthrough, fixed, pool_divisor))
        self.slot_of[anchor] = slot
        return slot

    def _after_pass_through(self, node: fx.Node) -> fx.Node:
        """Where the point goes: after the identities-in-eval (Dropout, DropPath, Identity) that alone consume
        `node`, so the tensor TFLite keeps (the op's output) is the one quantized, also at a model output."""
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not self.is_identity(user):
                break
            node = user
        return node

    def alias(self, node: fx.Node, src: fx.Node) -> None:
        """`node` is `src` in the TFLite graph (an identity or folded op): no point, same range."""
        self.slot_of[node] = self.input_slot(src)

    def input_slot(self, src: fx.Node) -> int:
        if src not in self.slot_of:  # a float (skipped) producer: quantize its output where it is used
            self.add_point(src, OpKind.SAME_SCALE)
        return self.slot_of[src]

    def refuse(self, node: fx.Node, reason: str, fix: str = "") -> None:
        """Record an unsupported node; prepare_qat reports all of them in one error."""
        path = module_path(self.gm, node)
        fix = fix or ("change the model, or, if TFLite has an int8 kernel for this op, let the converter quantize "
                      f"it unsimulated with QATConfig(skip=[{(path if node.op == 'call_module' else node.name)!r}])")
        self.problems.append(f"node '{node.name}' (op {describe(self.gm, node)}) at module path '{path}': {reason}. "
                             f"Fix: {fix}")

    def error(self) -> UnsupportedLayerError:
        n = len(self.problems)
        return UnsupportedLayerError(
            f"cannot quantize {n} node{'s' if n > 1 else ''} of this model:\n  " + "\n  ".join(self.problems)
            + "\nA skipped op trains in float with its own output range; the model stays full-integer only if the "
            "converter has an int8 kernel for it (else the conversion fails).")


def label(gm: fx.GraphModule, node: fx.Node) -> str:
    """Stable, readable name of the op a point follows: module path, or enclosing path + function name."""
    if node.op == "placeholder":
        return f"input:{node.name}"
    if node.op == "call_module" and "xqat_functional" not in node.meta:
        return str(node.target)
    return node.meta.setdefault("xqat_label", _functional_name(gm, node))


def _functional_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """`<enclosing module path>.<op name>`, numbered within that path in graph order (add, add_1, ...)."""
    path = module_path(gm, node)
    op = node.meta.get("xqat_functional") or getattr(node.target, "__name__", str(node.target)).strip("_")
    base = op if path == "<top>" else f"{path}.{op}"
    taken = gm.meta.setdefault("xqat_labels", set())
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def install_points(plan: Plan) -> None:
    """One ActivationQuantizer per range group (registered once, in `xqat_quantizers`), and a QuantPoint
    call after each anchor. The group's observer is its last concat if it has one, else its first point."""
    gm, cfg = plan.gm, plan.config
    groups: dict[int, list[Point]] = {}
    for p in plan.points:
        groups.setdefault(plan.slots.find(p.slot), []).append(p)
    quantizers, qpoints = nn.ModuleDict(), nn.ModuleDict()
    key_of: dict[int, str] = {}  # group root slot -> its quantizer's key
    for root, members in groups.items():
        fixed = next((p.fixed for p in members if p.fixed), "")
        cats = [p for p in members if p.kind is OpKind.CAT]
        owner = cats[-1] if cats else members[0]
        key = key_of[root] = owner.anchor.name
        quantizers[key] = ActivationQuantizer(
            num_bits=cfg.activation_bits, ema=cfg.ema, decay=cfg.ema_decay, quant_delay=cfg.quant_delay,
            learn=cfg.learn_ranges, warmup=cfg.range_warmup_steps, fixed_range=FIXED_RANGES[fixed] if fixed else None,
            sync=cfg.sync_ranges, outliers=cfg.range_outliers, outlier_factor=cfg.range_outlier_factor)
        for p in members:
            observe = p is owner and not fixed
            passthrough = p.passthrough and p is not owner
            qpoints[p.anchor.name] = QuantPoint(quantizers[key], observe=observe, passthrough=passthrough, group=key,
                                                label=p.label, pool_divisor=p.pool_divisor if p is not owner else 0)
    gm.add_module(QUANTIZERS, quantizers)
    gm.add_module(POINTS, qpoints)
    for node in gm.graph.nodes:  # each weight layer learns its input's group: the grid of its int32 bias
        layer = gm.get_submodule(node.target) if node.op == "call_module" else None
        src = node.args[0] if isinstance(layer, WeightQuantizedModule) and node.args else None
        key = key_of.get(plan.slots.find(plan.slot_of[src])) if isinstance(src, fx.Node) and src in plan.slot_of \
            else None
        if key is not None:
            layer.link_input(quantizers[key])
    for p in plan.points:
        with gm.graph.inserting_after(p.anchor):
            q = gm.graph.call_module(f"{POINTS}.{p.anchor.name}", (p.anchor,))
        q.meta = dict(p.anchor.meta)
        p.anchor.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
