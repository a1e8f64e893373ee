"""Trace a model with torch.fx, its leaves chosen for channel analysis, and record every node's shape.

`trace_graph` is what channel grouping (`slimctl.trace.walk`) and BN folding (`slimctl.core.fold`)
read a model's structure from: torch.nn modules, ChannelSelection and the library layers
`rules.is_leaf` names stay whole; a BatchNorm subclass's drop/act become nodes of their own.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimctl.base.inserted import ChannelSelection
from slimctl.errors import SlimctlError
from slimctl.trace.rules import bn_parts, frozen_bn_note, is_leaf

# --- tracing -------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Leaves: torch.nn modules, ChannelSelection and the library layers `rules.is_leaf` names;
    remembers which module it is inside.

    A BatchNorm subclass that applies more after normalising (timm's BatchNormAct2d: BN → drop →
    act) becomes one node for the BN followed by its parts as nodes of their own (`<bn>.drop`,
    `<bn>.act`), so the op table judges its activation exactly as a separate one. (Run as a
    GraphModule, the BN node still calls the whole module and its parts then run a second time:
    the graph is read for its structure and shapes only, never for values.)"""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ChannelSelection) or is_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001
        self.stack.append(self.path_of_module(m))
        try:
            parts = bn_parts(m) if frozen_bn_note(m, "") is None else None
            if parts:
                out = self.create_proxy("call_module", self.stack[-1], args, kwargs)
                for part in parts:
                    out = self.call_module(part, part.forward, (out,), {})
                return out
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: the one whose Python broke
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace_graph(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """The model's fx graph with every node's shape on `example_input` (refusals name the culprit)."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, … on data-dependent Python
        where = tracer.failed_in or type(model).__name__
        raise SlimctlError(
            f"cannot trace {type(model).__name__}: module {where!r} ({type(exc).__name__}: {exc}). "
            "Mark that module a leaf (it then keeps its channels) or declare channel_groups() by hand."
        ) from exc
    gm = fx.GraphModule(tracer.root, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise SlimctlError(
            f"{type(model).__name__} does not run on an example input of shape {tuple(example_input.shape)}: "
            f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__} (try a larger input size)"
        ) from exc
    return gm
