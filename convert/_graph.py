"""Read a model's dataflow with torch.fx to find which BatchNorms may fuse into the conv before them.

Module names say nothing reliable about dataflow (a ResNet's ``bn1`` follows ``conv1``, a pre-activation
block's ``bn2`` follows ``conv1``, a stem's BatchNorm may live in another parent than its conv), so the opt-in
BatchNorm pass of folding decides from the traced graph: which module's output feeds which, and whether
anything else reads it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from ndeconv.layers import ChannelDeconv, Delinear, FastDeconv
from ndeconv.layers._conv import Conv2d

__all__ = ["ModelGraph", "trace_model"]

# Metadata reads (x.size(0), x.shape, x.dim()) consume no data: they do not count as users of a value.
_META_METHODS = {"size", "dim"}


def _timm_tracer_settings() -> tuple[tuple, tuple]:
    try:
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # an older or newer timm without the registry: trace through everything
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class _Tracer(fx.Tracer):
    """Keeps the deconvolution layers (data-dependent code), ndeconv's Conv2d (a plain conv, as nn.Conv2d is) and
    timm's no-trace modules as leaves."""

    def __init__(self) -> None:
        leaves, functions = _timm_tracer_settings()
        super().__init__(autowrap_functions=functions)
        self._extra_leaves = (FastDeconv, Delinear, ChannelDeconv, Conv2d, *leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._extra_leaves) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class ModelGraph:
    """A model's traced graph with the facts folding asks about."""

    graph: fx.Graph
    modules: dict[str, nn.Module]
    calls: Counter = field(default_factory=Counter)

    def module_nodes(self, kind: type | tuple[type, ...]) -> list[fx.Node]:
        """Call sites of modules of ``kind`` whose module runs exactly once per forward."""
        return [
            n for n in self.graph.nodes
            if n.op == "call_module" and isinstance(self.modules[n.target], kind) and self.calls[n.target] == 1
        ]

    @staticmethod
    def data_users(node: fx.Node) -> list[fx.Node]:
        """Nodes that read ``node``'s values (shape queries excluded)."""
        users = []
        for user in node.users:
            if user.op == "call_method" and user.target in _META_METHODS:
                continue
            if user.op == "call_function" and user.target is getattr:
                continue
            users.append(user)
        return users

    def sole_reader(self, node: fx.Node) -> fx.Node | None:
        """The one node reading ``node``'s values, taking them as its first argument, else None."""
        users = self.data_users(node)
        if len(users) != 1:
            return None
        user = users[0]
        if not user.args or user.args[0] is not node:
            return None
        others = list(user.args[1:]) + list(user.kwargs.values())
        if any(a is node for a in _flatten_args(others)):
            return None
        return user


def _flatten_args(args: object) -> list:
    out: list = []
    fx.node.map_aggregate(args, out.append)
    return out


def trace_model(model: nn.Module) -> ModelGraph:
    """Trace ``model`` symbolically (no data runs). Raises whatever torch.fx raises on untraceable code."""
    graph = _Tracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    return ModelGraph(graph=graph, modules=dict(model.named_modules()), calls=calls)
