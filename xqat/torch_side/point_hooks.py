"""Point hooks: stateless modules called right after a fake-quant point with the point's output and the tensor
inputs of the op before it, whose result replaces the point's output downstream.

This is the seam exact numerics use (`xqat.set_numerics`, docs/architecture.md): torch_side only knows that a
point may be followed by a hook, not what it computes. Hooks hold no parameters or buffers, so `state_dict()` is
the same with or without them; the export pass removes them (`detach_point_hooks`) and traces the "tf" graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import fx, nn

from .placement import POINTS

__all__ = ["HOOKS", "attach_point_hooks", "detach_point_hooks", "hook_key", "point_hooks"]

HOOKS = "xqat_point_hooks"


def hook_key(node: fx.Node) -> str | None:
    """The point key of a hook node, or None if `node` is not a hook call."""
    target = str(node.target)
    return target[len(HOOKS) + 1:] if node.op == "call_module" and target.startswith(HOOKS + ".") else None


def point_hooks(gm: nn.Module) -> Mapping[str, nn.Module]:
    """The hooks installed on a QAT model, by point key (empty if none)."""
    hooks = getattr(gm, HOOKS, None)
    return dict(hooks.items()) if isinstance(hooks, nn.ModuleDict) else {}


def attach_point_hooks(gm: fx.GraphModule, hooks: Mapping[str, tuple[nn.Module, Sequence[fx.Node]]]) -> None:
    """After each point `key` in `hooks`, call `hook(point_output, *inputs)` and pass its result on instead of the
    point's output. `inputs` are graph nodes (the op's tensor inputs); an input that is a hooked point is read
    from its hook. Any hooks already there are removed first."""
    detach_point_hooks(gm)
    if any(sum(1 for _ in h.parameters()) or sum(1 for _ in h.buffers()) for h, _ in hooks.values()):
        raise ValueError("point hooks must hold no parameters or buffers (state_dict must not change)")
    setattr(gm, HOOKS, nn.ModuleDict({k: h for k, (h, _) in hooks.items()}))
    replaced: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        target = str(node.target)
        key = target[len(POINTS) + 1:] if node.op == "call_module" and target.startswith(POINTS + ".") else None
        if key not in hooks:
            continue
        args = (node, *[replaced.get(n, n) for n in hooks[key][1]])
        with gm.graph.inserting_after(node):
            hook = gm.graph.call_module(f"{HOOKS}.{key}", args)
        node.replace_all_uses_with(hook, delete_user_cb=lambda user, h=hook: user is not h)
        replaced[node] = hook
    gm.graph.lint()
    gm.recompile()


def detach_point_hooks(gm: fx.GraphModule) -> None:
    """Remove every point hook: the graph computes the "tf" numerics again."""
    nodes = [n for n in gm.graph.nodes if hook_key(n) is not None]
    for node in nodes:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    if hasattr(gm, HOOKS):
        delattr(gm, HOOKS)
    if nodes:
        gm.graph.lint()
        gm.recompile()
