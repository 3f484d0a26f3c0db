"""Counting MACs with torch.utils.flop_counter, including the CPU attention kernel it misses.

torch's flop registry has formulas for the CUDA SDPA kernels but not for
`aten._scaled_dot_product_flash_attention_for_cpu` (used on the CPU when Q, K and V widths
agree), so without this mapping a model's attention MACs silently vanish on the CPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


aten = torch.ops.aten


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                        out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


@contextlib.contextmanager
def exact_attention_widths(model: torch.nn.Module):
    """Turn off the zero-padding of head widths in this model's attention modules (a kernel
    choice, not model arithmetic; models.revit.sdpa_widths) and restore it afterwards."""
    mods = [m for m in model.modules() if hasattr(m, "pad_widths")]
    old = [m.pad_widths for m in mods]
    for m in mods:
        m.pad_widths = False
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.pad_widths = o


def flop_counter() -> FlopCounterMode:
    """A silent counter of MACs x 2, the CPU attention kernel included."""
    return FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS)


@torch.no_grad()
def count_macs(model: torch.nn.Module, batch: int = 1) -> tuple[float, dict[str, float]]:
    """(total MACs, MACs per module name) of one eval forward at the model's input size."""
    dims = model.dims
    x = torch.zeros(batch, dims.in_chans, dims.img_size, dims.img_size,
                    device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with exact_attention_widths(model), flop_counter() as counter:
        model(x)
    model.train(was_training)
    per_module = {name: sum(ops.values()) / 2 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() / 2, per_module
