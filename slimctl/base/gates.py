"""Gates: what pruning keeps of a squeeze-and-excitation gate's layer for its removed channels.

A removed channel c that a gate multiplies (x · act(fc(…))) reaches its consumer as c·g(x). The
gate's logits layer keeps its rows for the removed channels in a `GateRows` child (`<layer>.gate_rows`);
a forward hook computes g_removed(x) from the layer's input each forward and hands it to the
consumer's ConstantResponse (`slimctl.base.inserted`, linked by `link_gates` there). The gate's
elementwise ops are plain data (`GATE_OPS`), read off the graph by `slimctl.trace.rules`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimctl.base.operators import layer_operator, pointwise

GATE = "gate_rows"  # the child name of a GateRows: `<layer computing a gate's logits>.gate_rows`
# The elementwise ops a gate chain may contain (`slimctl.trace.rules.gate_module_op` reads them off
# the graph), as op → f(x, a, b). The code a GateRows stores is the op's index here.
GATE_OPS = {
    "sigmoid": lambda x, a, b: torch.sigmoid(x),
    "hardsigmoid": lambda x, a, b: nn.functional.hardsigmoid(x),
    "relu": lambda x, a, b: torch.relu(x),
    "tanh": lambda x, a, b: torch.tanh(x),
    "hardtanh": lambda x, a, b: nn.functional.hardtanh(x, a, b),
    "add": lambda x, a, b: x + a,
    "rsub": lambda x, a, b: a - x,
    "mul": lambda x, a, b: x * a,
    "div": lambda x, a, b: x / a,
}
GATE_CODES = tuple(GATE_OPS)


def gate_functions(ops: torch.Tensor) -> list[tuple[Callable, float, float]]:
    """The gate's elementwise ops ([n, 3]: code in GATE_CODES, a, b) as plain Python, read once."""
    return [(GATE_OPS[GATE_CODES[int(code)]], a, b) for code, a, b in ops.tolist()]


def apply_gate(z: torch.Tensor, functions: list[tuple[Callable, float, float]]) -> torch.Tensor:
    """The gate's elementwise ops on its logits `z`, in order."""
    for op, a, b in functions:
        z = op(z, a, b)
    return z


class GateRows(nn.Module):
    """The rows a gate's logits layer lost when its channels were removed, kept to compute
    g_removed(x) = act(W_removed · h + b_removed) for the consumer that reads c·g(x) (a squeeze-and-
    excitation block: x · sigmoid(fc2(…))). Child `gate_rows` of that layer, run by a forward hook on
    its input h; the values go to the consumer's ConstantResponse (`sink`: the consumer's name),
    which adds W_consumer[:, removed]·(c ⊙ g) — a cost proportional to the removed channels.
    Buffers: `weight` [k, in, kh, kw] (a conv's rows) or [k, in] (a Linear's), `bias` [k], `ops`
    [n, 3] (code in GATE_CODES, a, b). The sink is part of its recorded shape (as bytes), so a model
    rebuilt from a checkpoint's widths is linked before any weight is loaded."""

    def __init__(self, rows: int, inputs: int, kh: int = 0, kw: int = 0, ops: int = 0, *sink: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(rows, inputs, kh, kw) if kh else torch.zeros(rows, inputs))
        self.register_buffer("bias", torch.zeros(rows))
        self.register_buffer("ops", torch.zeros(ops, 3))
        self.sink = bytes(sink).decode()
        object.__setattr__(self, "_sink", None)  # the sink's ConstantResponse (`inserted.link_gates`), not a child
        self.refresh()

    def refresh(self) -> None:
        """Read the `ops` buffer into plain Python once (after it is written or loaded), so a forward
        never reads a tensor's values (torch.export and ONNX export cannot)."""
        self._ops = gate_functions(self.ops)
        self._product: tuple | None = None  # (key, weight [in, k], bias [k], the buffers) of the matrix product

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    @property
    def shape(self) -> list[int]:
        """[rows, inputs, kh, kw, ops, *the sink's name as bytes]: what a checkpoint records to recreate it."""
        w = self.weight.shape
        return [w[0], w[1], *(w[2:] if len(w) == 4 else (0, 0)), self.ops.shape[0], *self.sink.encode()]

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """g_removed for the layer's input `x`: its removed rows, then the gate's elementwise ops."""
        if x.dim() == 4 and x.shape[2] == 1 and x.shape[3] == 1 and self._buffers["weight"].dim() == 4 \
                and pointwise(layer):
            # A squeeze-and-excitation gate's 1×1 conv on the pooled [N, C, 1, 1]: one matrix product
            # with its bias, [N, k] (this runs every forward of the pruned model, so the transposed
            # weight is kept, not rebuilt: each op costs microseconds at batch 1).
            weight, bias = self.product_terms(x.dtype)
            return apply_gate(torch.addmm(bias, x.flatten(1), weight), self._ops)
        z = layer_operator(layer, self.weight.to(x.dtype), x)
        return apply_gate(z + self.bias.to(x.dtype).view((1, -1) + (1,) * (z.dim() - 2)), self._ops)

    def product_terms(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [in, k], bias [k]) in `dtype` for the matrix-product path, kept until the dtype or
        a buffer changes (under torch.compile, rebuilt: the graph holds no Python state)."""
        weight, bias = self._buffers["weight"], self._buffers["bias"]
        if torch.compiler.is_compiling():
            return weight.flatten(1).t().to(dtype), bias.to(dtype)
        # The buffers' identities too (`.to()` replaces them); the cache holds them, so no id is reused.
        key = (dtype, id(weight), weight._version, id(bias), bias._version)
        product = self._product
        if product is None or product[0] != key:
            product = (key, weight.flatten(1).t().to(dtype).contiguous(), bias.to(dtype), weight, bias)
            object.__setattr__(self, "_product", product)
        return product[1], product[2]

    def extra_repr(self) -> str:
        return f"rows={self.weight.shape[0]}, sink={self.sink!r}"


def gate_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    rows = module._modules[GATE]
    if rows._sink is not None:  # a plain attribute write: nn.Module.__setattr__ costs microseconds per forward
        object.__setattr__(rows._sink, "_gate", rows.forward(module, inputs[0]))


def gate_rows_of(layer: nn.Module) -> GateRows | None:
    child = getattr(layer, GATE, None)
    return child if isinstance(child, GateRows) else None


def attach_gate_rows(layer: nn.Module, rows: GateRows) -> GateRows:
    """`rows` as the layer's child `gate_rows` (on its device), hooked once."""
    rows = rows.to(layer.weight.device)
    layer.add_module(GATE, rows)
    if gate_hook not in layer._forward_hooks.values():
        layer.register_forward_hook(gate_hook)
    return rows
