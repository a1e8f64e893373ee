"""Modules slimctl adds inside a network, each with one name, one way to insert it and one way to
find it again: `ChannelSelection` (child `select` of a BN), `ConstantResponse` (child `compensate`
of a conv or Linear) and, from `slimctl.base.gates`, `GateRows` (child `gate_rows` of a gate's layer).

`ChannelSelection` passes on only the kept channels of a BN that must keep its width (the paper's
"channel selection"). The paper's pre-activation families hold one as an ordinary module; in any
other model (a traced torchvision model) slimctl adds it as the child `select` of the BN itself and
applies it with a forward hook, so the BN keeps its name and its state_dict keys (the selection adds
`<bn>.select.indices`). A checkpoint records `<bn>.select` among its widths, and `insert_recorded`
recreates the child before the weights are loaded.

`ConstantResponse` carries what removed channels still contributed: a channel whose γ ≈ 0 emits
the constant β, which the next layer reads as a bias. Pruning (`slimctl.core.compensate`) stores that
constant's response and adds it to the layer's output, so removal does not shift later
activations. Recorded and recreated the same way (`<layer>.compensate`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimctl.base.gates import GATE, GateRows, gate_hook, attach_gate_rows, gate_rows_of
from slimctl.base.operators import kernel_response, layer_operator, profile_map, reads_alike, zero_padded
from slimctl.errors import SlimctlError

SELECT = "select"  # the child name of an inserted ChannelSelection: `<bn>.select`
COMPENSATE = "compensate"  # the child name of a ConstantResponse: `<conv or linear>.compensate`


class ChannelSelection(nn.Module):
    """Pass on only the kept channels of a BN that must keep its width (the paper's "channel selection").

    A pre-activation BN sits on a stream that other layers read at full width, so it cannot
    shrink; the conv after it reads only the kept channels. The kept indices are a buffer, not a
    Parameter: they get no gradient, are saved in the state_dict, work under DDP and torch.compile,
    and selecting is one `index_select` on the device (no host sync).
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("indices", torch.arange(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kept indices are sorted and distinct (surgery only ever subsets them), so keeping every
        # channel is the identity: no gather, which costs a full-width copy (prune's unpruned
        # reference, a group the plan left whole).
        if self.indices.numel() == x.shape[1]:
            return x
        return x.index_select(1, self.indices)

    def extra_repr(self) -> str:
        return f"keeps={self.indices.numel()}"


_ROW_TERMS = ("bias", "kernel", "pkernel", "gate_weight")  # ConstantResponse buffers indexed by output


class ConstantResponse(nn.Module):
    """The response of a layer to what its removed input channels still emitted, added to its output.

    A removed channel (γ ≈ 0) emits the constant β; what the layer reads of it is c (after
    activations), c·P (after stride-1 average pools that count zero padding: P those pools applied
    to an all-ones map), or c·g(x) (after a squeeze-and-excitation gate g). Buffers:
    - `bias` [out]: a per-channel term (the whole term for a Linear or a conv that reads a constant
      alike everywhere; `--compensate bias` keeps only this);
    - `kernel` [out, kh, kw]: the reduced kernel Σ_c W[o, c]·c_c (each output over its own group's
      removed inputs), applied with the layer's own operator (`layer_operator`) to an all-ones map:
      exact near zero-padded borders and at any input size; 0×0 when unused;
    - `pkernel` [out, kh, kw] and `profile` [n, 4]: the same for the c·P inputs;
    - `gate_weight` [out, k, kh, kw]: W[:, removed]·c for k gated inputs, applied each forward to the
      gate values g_removed(x) that the gate's `GateRows` hands over (`gate_source`: its layer's name,
      as bytes).
    The constant maps are computed once per input size, dtype and layout, and kept.
    """

    def __init__(self, out: int, kh: int = 0, kw: int = 0, profiles: int = 0, gated: int = 0,
                 source: int = 0) -> None:
        super().__init__()
        self.register_buffer("bias", torch.zeros(out))
        self.register_buffer("kernel", torch.zeros(out, kh, kw))
        if profiles:
            self.register_buffer("pkernel", torch.zeros(out, kh, kw))
            self.register_buffer("profile", torch.zeros(profiles, 4, dtype=torch.long))
        if gated:
            self.register_buffer("gate_weight", torch.zeros(out, gated, kh, kw))
            self.register_buffer("gate_source", torch.zeros(source, dtype=torch.uint8))
        self._last: tuple[tuple, torch.Tensor] | None = None  # (key, map) of the last position_map
        self._uniform: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # (key, uniform_response terms)
        self._alike: bool | None = None  # whether the whole term is `uniform_response` (read off its layer once)
        self.refresh()
        self._gate: torch.Tensor | None = None  # this forward's g_removed(x), set by the gate's GateRows

    def refresh(self) -> None:
        """Read the `profile` buffer into plain ints once (after it is written or loaded), so a
        forward never reads a tensor's values (torch.export and ONNX export cannot)."""
        profile = self._buffers.get("profile")
        self._profile = [tuple(int(v) for v in row) for row in profile.tolist()] if profile is not None else []
        self._last = self._uniform = self._alike = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    @property
    def shape(self) -> list[int]:
        """What a checkpoint records to recreate it: [out, kh, kw] (kh = kw = 0: per channel only),
        then [profiles, gated inputs, length of the gate's name] when it has either."""
        base = list(self.kernel.shape)
        if "profile" not in self._buffers and "gate_weight" not in self._buffers:
            return base
        profiles = self.profile.shape[0] if "profile" in self._buffers else 0
        gated = self.gate_weight.shape[1] if "gate_weight" in self._buffers else 0
        source = self.gate_source.numel() if gated else 0
        return base + [profiles, gated, source]

    @property
    def source(self) -> str | None:
        """The name of the layer whose GateRows computes this response's gate values, if any."""
        return bytes(self.gate_source.tolist()).decode() if "gate_source" in self._buffers else None

    def forward(self, output: torch.Tensor, layer: nn.Module, input_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """`output` of `layer` plus the response; `input_hw`: the layer's input H, W (per-position term).

        Added in place: the output keeps its memory format (channels_last stays channels_last) and
        no second feature map is allocated; the conv's backward does not need its output."""
        alike = self._alike
        if alike is None:
            alike = "gate_weight" in self._buffers and "pkernel" not in self._buffers and reads_alike(layer)
            object.__setattr__(self, "_alike", alike)
        if alike:
            return output.add_(self.uniform_response(output))
        if self._buffers["kernel"].numel():
            output = output.add_(self.position_map(layer, tuple(input_hw), output))
        else:
            output = output.add_(self.bias.view((1, -1) + (1,) * (output.dim() - 2)).to(output.dtype))
        if "gate_weight" in self._buffers:
            output = output.add_(self.gate_response(layer, tuple(input_hw), output))
        return output

    def uniform_response(self, like: torch.Tensor) -> torch.Tensor:
        """[N, out, 1, 1] (or [N, out]): the whole response of a layer that reads a constant alike
        everywhere (`reads_alike`), gated part included, as one matrix product: bias + kernel sums
        + g_removed(x) · W_gated. A squeeze-and-excitation block's consumer runs this each forward,
        so it is two ops and one pass over the output instead of one pass per term (MobileNet-V3 at
        batch 1: about 20% of the pruned model's time went to the terms one by one)."""
        gate = self._take_gate()
        buffers = self._buffers
        kernel, bias, weight = buffers["kernel"], buffers["bias"], buffers["gate_weight"]
        key = (like.dtype, kernel.device, kernel._version, bias._version, weight._version)
        if torch.compiler.is_compiling() or self._uniform is None or self._uniform[0] != key:
            per_channel = bias + kernel.sum((1, 2)) if kernel.numel() else bias
            terms = (per_channel.to(like.dtype), weight.sum((2, 3)).t().to(like.dtype))  # [out], [k, out]
            self._uniform = (key, terms)
        per_channel, gated = self._uniform[1]
        if gate.dim() > 2 or gate.dtype != like.dtype:  # the gate rows' matrix product hands [N, k] in its dtype
            gate = gate.flatten(1).to(like.dtype)
        term = torch.addmm(per_channel, gate, gated)
        return term.view(*term.shape, *(1,) * (like.dim() - 2))

    def _take_gate(self) -> torch.Tensor:
        """This forward's gate values, cleared so that none outlives it (a plain attribute write:
        nn.Module.__setattr__ costs microseconds per forward)."""
        gate = self._gate
        object.__setattr__(self, "_gate", None)
        if gate is None:
            raise RuntimeError(f"the gate values of {self.source!r} were not computed before this layer ran")
        return gate

    def position_map(self, conv: nn.Module, input_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """[1, out, H_out, W_out]: bias plus the kernel terms at each output position, for an input of
        `input_hw`, in the dtype and memory format of `like` (the layer's output; adding a map laid out
        like it is one aligned pass). Computed once per size, dtype and layout, then kept until any of
        those, or the buffers, change. This runs on every forward of every compensated layer, so the
        check reads plain attributes and dicts only (a buffer read through nn.Module costs ~1 µs)."""
        buffers = self._buffers
        kernel, bias = buffers["kernel"], buffers["bias"]
        channels_last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
        key = (input_hw, like.dtype, channels_last, kernel.device, kernel._version, bias._version,
               buffers["pkernel"]._version if "pkernel" in buffers else 0)
        compiling = torch.compiler.is_compiling()
        if not compiling and self._last is not None and self._last[0] == key:
            return self._last[1]
        result = kernel_response(conv, kernel, torch.ones(1, 1, *input_hw, device=kernel.device, dtype=kernel.dtype))
        if "pkernel" in buffers:
            result = result + kernel_response(conv, buffers["pkernel"], profile_map(self._profile, input_hw, kernel))
        result = (result + bias[:, None, None]).to(like.dtype).unsqueeze(0)
        if channels_last:
            result = result.contiguous(memory_format=torch.channels_last)
        if not compiling:
            self._last = (key, result)
        return result

    def gate_response(self, layer: nn.Module, input_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """W[:, removed]·(c ⊙ g_removed(x)) for this forward's gate values: [N, out, 1, 1] when the
        layer reads a spatially constant map alike everywhere, else the layer's operator on the map."""
        gate = self._take_gate()
        weight = self._buffers["gate_weight"].to(like.dtype)  # [out, k, kh, kw]: gated consumers are convs
        gate = gate.reshape(gate.shape[0], gate.shape[1], *([1] * (like.dim() - 2))).to(like.dtype)
        if not zero_padded(layer) and all(d == 1 for d in gate.shape[2:]):
            return (gate.flatten(1) @ weight.sum((2, 3)).t()).reshape(gate.shape[0], -1, *([1] * (like.dim() - 2)))
        return layer_operator(layer, weight, gate.expand(*gate.shape[:2], *input_hw))

    def take_rows(self, rows: torch.Tensor) -> ConstantResponse:
        """A copy holding the terms of the outputs `rows` only (its layer lost the other outputs)."""
        new = ConstantResponse(len(rows), *self.shape[1:]).to(self.bias)  # its dtype before any copy (float64 stays)
        with torch.no_grad():
            for name, value in self._buffers.items():
                new._buffers[name].copy_(value[rows.to(value.device)] if name in _ROW_TERMS else value)
        new.refresh()
        return new

    @torch.no_grad()
    def scale_rows(self, scale: torch.Tensor) -> None:
        """Every term × `scale` [out] per output (a BN folded into the layer: it scaled the response too)."""
        for name in _ROW_TERMS:
            if name in self._buffers:
                term = self._buffers[name]
                term.copy_(term.to(scale.dtype) * scale.view(-1, *(1,) * (term.dim() - 1)))
        self._last = self._uniform = None

    def zero_(self) -> None:
        """No removed channel: every term zero (a network trained from scratch)."""
        for name, buffer in self._buffers.items():
            if buffer.is_floating_point():
                buffer.zero_()
        self._last = self._uniform = None

    def extra_repr(self) -> str:
        kind = ", per position" if self.kernel.numel() else ", per channel"
        kind += ", profiled" if "profile" in self._buffers else ""
        return f"out={self.kernel.shape[0]}" + kind + (f", gated by {self.source!r}" if self.source else "")


def link_gates(model: nn.Module) -> nn.Module:
    """Point every GateRows at the ConstantResponse its `sink` names (after a load, a copy or a swap
    of the consumer), so the gate values reach it each forward."""
    for name, rows in model.named_modules():
        if isinstance(rows, GateRows):
            try:
                sink = response_of(model.get_submodule(rows.sink))
            except AttributeError:
                sink = None
            if sink is None:
                raise SlimctlError(f"gate rows {name!r} feed {rows.sink!r}, which has no constant response")
            object.__setattr__(rows, "_sink", sink)
    return model


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def selection_of(bn: nn.Module) -> ChannelSelection | None:
    """The ChannelSelection inserted into `bn` (its child `select`), if any."""
    child = getattr(bn, SELECT, None)
    return child if isinstance(child, ChannelSelection) else None


def _select_hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, SELECT)(output)


def insert_selections(model: nn.Module, bn_names: tuple[str, ...] | list[str]) -> None:
    """Give each named BN a child `select` (ChannelSelection) applied to its output by a forward hook
    (in place; a BN that already has one is left alone)."""
    for name in bn_names:
        bn = model.get_submodule(name)
        if selection_of(bn) is not None:
            continue
        bn.add_module(SELECT, ChannelSelection(bn.num_features).to(bn.weight.device))
        bn.register_forward_hook(_select_hook)


def _response_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # `.forward` directly: no module-call machinery per layer at batch 1 (ConstantResponse has no hooks).
    return module._modules[COMPENSATE].forward(output, module, inputs[0].shape[-2:])


def response_of(layer: nn.Module) -> ConstantResponse | None:
    """The ConstantResponse attached to a conv or Linear (its child `compensate`), if any."""
    child = getattr(layer, COMPENSATE, None)
    return child if isinstance(child, ConstantResponse) else None


def attach_response(layer: nn.Module, *, bias: torch.Tensor | None = None, kernel: torch.Tensor | None = None,
                    pkernel: torch.Tensor | None = None, profile: torch.Tensor | None = None,
                    gate_weight: torch.Tensor | None = None, gate_source: str | None = None) -> ConstantResponse:
    """Add terms to the layer's ConstantResponse (attaching one, and its forward hook, if it has none):
    a per-channel `bias` [out], a per-position `kernel` [out, kh, kw], a profiled `pkernel` with its
    `profile`, gated columns `gate_weight` [out, k, kh, kw] fed by `gate_source`'s GateRows (appended
    after the ones it has). A term it had (an earlier prune's) is kept; a profile must be the same."""
    out = layer.weight.shape[0]
    old = response_of(layer)
    had = dict(old._buffers) if old is not None else {}
    per_position = any(t is not None for t in (kernel, pkernel, gate_weight)) or bool(had and had["kernel"].numel())
    kh, kw = layer.kernel_size if per_position else (0, 0)
    profile = profile if profile is not None else had.get("profile")
    old_gated = had["gate_weight"].shape[1] if "gate_weight" in had else 0
    gated = old_gated + (gate_weight.shape[1] if gate_weight is not None else 0)
    source = (gate_source or (old.source if old is not None else None) or "").encode()
    new = ConstantResponse(out, kh, kw, 0 if profile is None else profile.shape[0], gated, len(source) if gated else 0)
    new = new.to(layer.weight)  # the layer's device and float dtype before any term is written (float64 stays)
    terms = new._buffers
    with torch.no_grad():
        for name, value in had.items():  # what it had (profile and gate_source too)
            if name == "gate_weight":
                terms[name][:, :old_gated] = value
            elif name != "kernel" or value.numel():
                terms[name].copy_(value)
        for name, value in (("bias", bias), ("kernel", kernel), ("pkernel", pkernel)):
            if value is not None:
                terms[name].add_(value.to(terms[name]))
        if profile is not None:
            terms["profile"].copy_(profile)
        if gate_weight is not None:
            terms["gate_weight"][:, old_gated:] = gate_weight.to(terms["gate_weight"])
        if gated:
            terms["gate_source"].copy_(torch.tensor(list(source), dtype=torch.uint8))
    new.refresh()
    return attach(layer, new)


def detach_response(layer: nn.Module) -> None:
    """Remove the layer's ConstantResponse and its hook (once its term lives in the layer's own bias)."""
    delattr(layer, COMPENSATE)
    for key, hook in list(layer._forward_hooks.items()):
        if hook is _response_hook:
            del layer._forward_hooks[key]
            layer._forward_hooks_always_called.pop(key, None)


def attach(layer: nn.Module, response: ConstantResponse) -> ConstantResponse:
    """`response` as the layer's child `compensate` (on its device, in its dtype), hooked once."""
    response = response.to(layer.weight)
    layer.add_module(COMPENSATE, response)
    if _response_hook not in layer._forward_hooks.values():
        layer.register_forward_hook(_response_hook)
    return response


def has_foreign_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward or forward-pre hooks other than the ones slimctl inserts (a
    selection's, a constant response's, a gate's rows'): code that may read or change its output unseen."""
    ours = (_select_hook, _response_hook, gate_hook)
    return bool(module._forward_pre_hooks) or any(h not in ours for h in module._forward_hooks.values())


def is_inserted(model: nn.Module, name: str) -> bool:
    """Whether `name` denotes a module slimctl inserts (`<bn>.select`, `<conv or linear>.compensate`),
    judged by its parent's type (a family's own `select` modules sit beside their BN, not in it)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return False
    return (child == SELECT and _is_bn(parent)) or \
        (child in (COMPENSATE, GATE) and isinstance(parent, (nn.Conv2d, nn.Linear)))


def insert_recorded(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Recreate the selections (`<bn>.select`), constant responses (`<layer>.compensate`) and gate
    rows (`<layer>.gate_rows`, linked to their consumers) a checkpoint's widths record but `model`
    lacks (call after resizing their parents)."""
    for name, shape in widths.items():
        if not is_inserted(model, name):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if child == SELECT:
            insert_selections(model, [parent_name])
        elif child == COMPENSATE and response_of(parent) is None:
            attach(parent, ConstantResponse(*shape))
        elif child == GATE and gate_rows_of(parent) is None:
            attach_gate_rows(parent, GateRows(*shape))
    link_gates(model)


def reattach_selections(model: nn.Module) -> nn.Module:
    """Re-hook inserted selections after a module swap that keeps a BN's children but not its hooks
    (`nn.SyncBatchNorm.convert_sync_batchnorm`): without it the consumers would get the full width."""
    for m in model.modules():
        if _is_bn(m) and selection_of(m) is not None and _select_hook not in m._forward_hooks.values():
            m.register_forward_hook(_select_hook)
    return model
