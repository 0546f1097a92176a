"""DoRA's weight norm without materialising the adapted weight: the same forward as PEFT's, measured faster on a CPU.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) scales each output row
of W + s·BA by m / ||W + s·BA|| (the norm of that row, detached from the graph as section 4.3 of the paper says).
PEFT's `DoraLinearLayer.forward` computes that norm by building the full (out, in) matrix W + s·BA in the input's
dtype on every forward: on a CPU that is a copy of every frozen weight to fp32, an add and a norm over all of it,
each step. On the default adapter (DoRA r16, all linear layers of SmolLM2-135M) it cost ~1 s of a ~3.5 s step
(bench/train_throughput.py).

The same norm from small factors, with W (out, in), B (out, r), A (r, in) and row i:

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ

||W_i||² is computed once per frozen weight (and again only if the weight changes, e.g. a merge); A Wᵀ is one
(r, in) x (in, out) matmul in W's dtype; A Aᵀ is (r, r). Nothing of size (out, in) is written. Everything else
(magnitude, the LoRA branch, the base result reused, bias handling, merging, saving) stays PEFT's: only
`forward` is replaced, by swapping the class of PEFT's `DoraLinearLayer` modules (`use_factored_norm`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def _factored_layer_class():
    import torch
    import torch.nn.functional as F
    from peft.tuners.lora.dora import DoraLinearLayer

    class FactoredNormDoraLinearLayer(DoraLinearLayer):
        """PEFT's DoRA linear layer with the weight norm from factors (module docstring). Shapes as PEFT's: x (..., in),
        returns the DoRA part of the output (..., out) that PEFT adds to the base layer's result."""

        def row_norm(self, weight, lora_A, lora_B, scaling: float):
            """||W_i + s·(BA)_i|| for each output row i, fp32, no gradient. weight (out, in); lora_A/B nn.Linear."""
            with torch.no_grad():
                key = (weight.data_ptr(), weight._version, weight.dtype)
                if getattr(self, "_w_sq_key", None) != key:
                    self._w_sq = weight.float().pow(2).sum(1)  # (out,)
                    self._w_sq_key = key
                a = lora_A.weight.float()  # (r, in)
                b = lora_B.weight.float()  # (out, r)
                a_wt = F.linear(a.to(weight.dtype), weight).float()  # (r, out) = A Wᵀ
                cross = (b * a_wt.T).sum(1)  # (out,)
                lora_sq = ((b @ (a @ a.T)) * b).sum(1)  # (out,)
                return (self._w_sq + 2 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0).sqrt()

        def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
            weight = base_layer.weight
            if self.fan_in_fan_out or weight.ndim != 2 or not weight.dtype.is_floating_point:
                return super().forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                       base_result=base_result, adapter_name=adapter_name)
            mag_norm_scale = (self.weight / self.row_norm(weight, lora_A, lora_B, scaling)).view(1, -1)
            lora_result = lora_B(lora_A(x))
            if base_result is not None:
                if base_layer.bias is not None:
                    base_result = base_result - base_layer.bias
            else:
                base_result = F.linear(x, weight.to(x.dtype))
            return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    return FactoredNormDoraLinearLayer


def use_factored_norm(model: Any) -> int:
    """Swap every PEFT `DoraLinearLayer` in `model` (plain, unquantised linear layers) for the factored-norm class
    in place; returns how many were swapped. Parameters, state dict and saved adapters are unchanged."""
    from peft.tuners.lora.dora import DoraLinearLayer

    cls = _factored_layer_class()
    n = 0
    for module in model.modules():
        if type(module) is DoraLinearLayer:
            module.__class__ = cls
            n += 1
    return n
