"""The element-wise steps and projections of a native layer, two ways: ATen ops as the Hugging Face modules write
them (:class:`TorchOps`, every dtype and device: the reference) and the CPU kernels fusing each element-wise step
into one pass, with bfloat16 projections on weights packed once for oneDNN (:class:`FusedOps`, half-precision models
on CPU). :func:`layer_ops` picks one for a model.

Both round where the Hugging Face modules round (values in float32, rounded to the model's dtype after each op the
modules run in that dtype), so they agree to one unit in the last place (``tests/test_native_fused_ops.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from twinkle_async.engines.torch.native.kernels import cpu_kernels

__all__ = ['TorchOps', 'FusedOps', 'layer_ops']

Activation = Callable[[torch.Tensor], torch.Tensor]


class TorchOps:
    """The reference: ATen ops, op for op as in the Hugging Face Llama modules."""

    def linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def weights_changed(self) -> None:
        """The model's weights were written or released in place (an update, sleep): forget what was derived."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight * norm(x)`` over the last axis; with ``residual``, ``x += residual`` in place first."""
        if residual is not None:
            x.add_(residual)
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x`` ``[T, heads, dim]`` with ``cos``/``sin`` ``[T, dim]`` (may reuse ``x``)."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def act_mul(self, gate_up: torch.Tensor, act: Activation) -> torch.Tensor:
        """``act(gate) * up`` of ``gate_up`` = ``[gate | up]`` on the last axis."""
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up


class FusedOps(TorchOps):
    """The CPU kernels (``csrc/fused_ops.cpp``) for 2-d rows and SiLU; other shapes and activations go to ATen.

    bfloat16 projections run on a copy of each weight reordered once into oneDNN's blocked layout (as PyTorch's
    inductor does when it freezes a CPU model) instead of ATen's GEMM packing the weight on every call: ~10% more
    tokens/s end to end on the default model, equal to ATen to one unit in the last place. The copies double those
    weights' memory; :meth:`weights_changed` (after every update and sleep) drops them, the next forward packs again.
    """

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        # id(weight) -> (weight, its packed copy): holding the weight keeps its id from being reused
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._packs = _onednn_bf16_linear()

    def linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        weight = layer.weight
        if not self._packs or weight.dtype != torch.bfloat16 or x.dim() != 2 or x.dtype != weight.dtype:
            return super().linear(x, layer)
        entry = self._packed.get(id(weight))
        if entry is None:
            entry = self._packed[id(weight)] = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], layer.bias, 'none', [], '')

    def weights_changed(self) -> None:
        self._packed.clear()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.stride(1) != 1:  # per-head norms (QK-norm)
            return super().rms_norm(x, weight, eps, residual)
        return self.kernels.rms_norm(x, residual, weight, eps)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            return super().rotate(x, cos, sin)
        self.kernels.rotary_(x, cos, sin)
        return x

    def act_mul(self, gate_up: torch.Tensor, act: Activation) -> torch.Tensor:
        if act is not F.silu or not gate_up.is_contiguous():
            return super().act_mul(gate_up, act)
        return self.kernels.silu_mul(gate_up)


def _onednn_bf16_linear() -> bool:
    """Whether this torch has oneDNN's packed-weight linear and this CPU runs it in bfloat16."""
    mkldnn = torch.ops.mkldnn
    try:
        return bool(torch.backends.mkldnn.is_available() and mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(mkldnn, '_reorder_linear_weight') and hasattr(mkldnn, '_linear_pointwise'))
    except (AttributeError, RuntimeError):
        return False


def layer_ops(dtype: torch.dtype, device: torch.device) -> TorchOps:
    """:class:`FusedOps` for a half-precision model on CPU where the kernels build, else :class:`TorchOps`."""
    if device.type != 'cpu' or dtype not in (torch.bfloat16, torch.float16):
        return TorchOps()
    kernels = cpu_kernels()
    return FusedOps(kernels) if kernels is not None else TorchOps()
