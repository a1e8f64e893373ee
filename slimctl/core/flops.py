"""Parameters and FLOPs counted the paper's way (reproduces 7.97e8 for VGG-19 on CIFAR).

Forward hooks on leaf modules, one 1×3×32×32 input; a multiply and an add count as two FLOPs:
conv (2·k²·C_in/groups + bias)·C_out·H_out·W_out; BN 2 per element; ReLU 1 per element; pooling
k² per output element; Linear 2·in·out + out; a pruning compensation term 1 per output element (an
add), plus its gate's rows where it has one. Other leaves (channel selection, dropout) count 0.
"""

from __future__ import annotations

import torch
from torch import nn

from slimctl.base.gates import gate_rows_of
from slimctl.base.inserted import response_of
from slimctl.base.registry import input_size as recorded_input_size


def count_params(model: nn.Module) -> int:
    """Trainable parameters (selection indices are buffers, so they do not count)."""
    return sum(p.numel() for p in model.parameters())


def _module_flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = 2 * kh * kw * module.in_channels // module.groups + (1 if module.bias is not None else 0)
        return per_output * output.numel()  # output.numel() = C_out·H_out·W_out at batch 1
    if isinstance(module, nn.BatchNorm2d):
        return 2 * output.numel()
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)):
        return output.numel()
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else k
        return kh * kw * output.numel()
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return 0  # counted by the caller from input/output sizes; see below
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
    return 0


def _response_flops(module: nn.Module, output: torch.Tensor) -> int:
    """A pruning compensation term on a conv or Linear: one add per output element (the per-size
    map is cached, so computing it does not count); a gated term adds, per sample, its gate rows
    (2·k·in) and its gated columns (2·k·out) for k removed channels (1×1 gates, the usual case)."""
    response, rows = response_of(module), gate_rows_of(module)
    flops = output.numel() if response is not None else 0
    if response is not None and "gate_weight" in response._buffers:
        flops += 2 * response.gate_weight.shape[0] * response.gate_weight.shape[1]
    if rows is not None:
        flops += 2 * rows.weight.shape[0] * rows.weight.shape[1]
    return flops


def count_flops(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """FLOPs of one forward pass at batch 1 (eval mode, on the model's own device), at `input_size`
    or the model's own (`registry.input_size`)."""
    if input_size is None:
        input_size = recorded_input_size(model)
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            # Each output element reduces a (H_in/H_out)×(W_in/W_out) window.
            h_in, w_in = inputs[0].shape[-2:]
            h_out, w_out = output.shape[-2:]
            total += (h_in // h_out) * (w_in // w_out) * output.numel()
        else:
            total += _module_flops(module, output) + _response_flops(module, output)

    # A BN may carry an inserted channel selection as a child, a conv or Linear a constant response:
    # they are still counted as leaves.
    leaves = [m for m in model.modules()
              if not list(m.children()) or isinstance(m, (nn.BatchNorm2d, nn.Conv2d, nn.Linear))]
    # prepend: see a BN's own output, before an inserted selection's hook narrows it.
    handles = [m.register_forward_hook(hook, prepend=True) for m in leaves]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
