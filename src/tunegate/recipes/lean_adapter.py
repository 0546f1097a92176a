"""PEFT's LoRA and DoRA linear layers with a leaner forward: the same function as PEFT's, fewer operations per step.

Two parts, both applied by `use_lean_forward(model)` after the trainer built its PEFT model, by swapping the class of
PEFT's modules (parameters, state dict, saving and merging stay PEFT's):

1. DoRA's weight norm from factors (below).
2. One pass for the adapter's output (`LeanLoraLinear`). PEFT's `lora.Linear.forward` casts the layer input to
   the adapter's dtype (fp32) even where bf16 autocast casts it straight back for the matmul, then adds
   `lora_B(lora_A(x)) * s` to the base output in separate operations; for DoRA it builds
   `(m/n - 1)·base + (m/n)·s·lora` in fp32 and adds that to the base output. The lean forward keeps the input as
   it is under autocast and computes `base + s·lora` in one `add` (LoRA) and `(m/n)·((base - bias) + s·lora) + bias`
   (DoRA: the same sum, rearranged; the sum in the output's dtype, the scale m/n applied in fp32). Anything else
   (dropout in training, several or disabled adapters, merged weights, mixed-adapter batches, other variants,
   quantised or fan_in_fan_out layers) goes through PEFT's forward.

The DoRA weight norm:

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) scales each output row
of W + s·BA by m / ||W + s·BA|| (the norm of that row, detached from the graph as section 4.3 of the paper says).
PEFT's `DoraLinearLayer.forward` computes that norm by building the full (out, in) matrix W + s·BA in the input's
dtype on every forward: on a CPU that is a copy of every frozen weight to fp32, an add and a norm over all of it,
each step. With PEFT's forward, DoRA r16 on all linear layers of SmolLM2-135M took 6.44 s per step against LoRA's
5.22 s (bench/results/train_throughput.json, before_dora / before_lora).

The same norm from small factors, with W (out, in), B (out, r), A (r, in) and row i:

    ||W_i + s·(BA)_i||² = ||W_i||² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ

||W_i||² is computed once per frozen weight (again when the weight tensor is replaced or bumps its version;
merged layers go through PEFT's forward, and PEFT's unmerge, written through `.data`, restores W up to rounding
without a version bump); A Wᵀ is one (r, in) x (in, out)
matmul in W's dtype; A Aᵀ and the rest are fp32 with autocast off. Nothing of size (out, in) is written. The
magnitude, merging and saving stay PEFT's.

`exact_dora_magnitude`: PEFT sets a new DoRA magnitude m = ||W + sBA|| in the base weights' dtype, so over bf16
base weights m is rounded to bf16 while the forward's norm is fp32: at step 0 every row would be scaled by
1 ± up to half a bf16 ulp, and a fresh adapter would not be the base model (DPO/KTO's reference is the base with
the adapter disabled). It recomputes m in fp32 with the forward's own norm, so the scale starts at exactly 1.

Not used under DeepSpeed or FSDP (`use_lean_forward` is skipped there by recipes.run): the lean forward reads
the adapter's parameters outside their modules' forward, which sharded parameters do not allow.
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
        """PEFT's DoRA linear layer, able to give its weight norm from factors (module docstring) to `LeanLoraLinear`.
        Its own forward stays PEFT's: the paths that fall back to PEFT (dropout in training, ...) use PEFT's norm."""

        def row_norm(self, weight, lora_A, lora_B, scaling: float):
            """||W_i + s·(BA)_i|| for each output row i, (out,) fp32, no gradient. weight (out, in); lora_A/B
            nn.Linear. A Wᵀ in W's dtype (bf16 weights: a bf16 matmul), everything else fp32 with autocast off."""
            # Without gradients (eval, generation, serving) nothing changes between forwards: the norm is kept
            # until a tensor it came from changes (data_ptr, version) or inference mode flips (a tensor made under
            # inference_mode cannot enter autograd later). The kept entry holds the three parameters, so a replaced
            # parameter's memory is not reused at the same address. Not seen: writes through `.data` (they bump
            # no version), such as PEFT's merge and unmerge, which restore W up to rounding (merged layers go
            # through PEFT's forward, not this norm). Weights loaded under inference_mode have no version counter:
            # nothing is kept for them.
            sources = (weight, lora_A.weight, lora_B.weight)
            tracked = not any(t.is_inference() for t in sources)
            frozen = tracked and not torch.is_grad_enabled()
            if frozen:
                norm_key = (*((t.data_ptr(), t._version) for t in sources), weight.dtype, scaling, torch.is_inference_mode_enabled())
                kept = getattr(self, "_kept_norm", None)
                if kept is not None and kept[0] == norm_key:
                    return kept[1]
            with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
                key = (weight.data_ptr(), weight._version, weight.dtype) if tracked else None
                if key is None or getattr(self, "_w_sq_key", None) != key:
                    self._w_sq = weight.float().pow(2).sum(1)  # (out,)
                    self._w_sq_key = key
                a = lora_A.weight.float()  # (r, in)
                b = lora_B.weight.float()  # (out, r)
                a_wt = F.linear(a.to(weight.dtype), weight).float()  # (r, out) = A Wᵀ
                cross = (b * a_wt.T).sum(1)  # (out,)
                lora_sq = ((b @ (a @ a.T)) * b).sum(1)  # (out,)
                norm = (self._w_sq + 2 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0).sqrt()
            if frozen:
                self._kept_norm = (norm_key, norm, sources)
            return norm

        def factored(self, base_layer) -> bool:
            """Whether the factored norm applies: a plain torch Linear (not a quantised layer) with a floating-point
            (out, in) weight."""
            if type(base_layer) is not torch.nn.Linear or type(base_layer.weight) is not torch.nn.Parameter:
                return False
            return not self.fan_in_fan_out and base_layer.weight.dtype.is_floating_point

    return FactoredNormDoraLinearLayer


@lru_cache(maxsize=None)
def _lean_linear_class():
    import torch
    from peft.tuners.lora.layer import Linear
    from torch import nn

    dora_cls = _factored_layer_class()

    class LeanLoraLinear(Linear):
        """PEFT's `lora.Linear` with the lean forward of the module docstring. x (..., in) -> (..., out)."""

        def forward(self, x, *args, **kwargs):
            if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return super().forward(x, *args, **kwargs)
            name = self.active_adapters[0]
            variant = self.lora_variant.get(name)
            dora = self.lora_magnitude_vector[name] if variant is not None and name in self.lora_magnitude_vector else None
            if name not in self.lora_A or (variant is not None and not (isinstance(dora, dora_cls) and dora.factored(self.get_base_layer()))) \
                    or (self.training and not isinstance(self.lora_dropout[name], nn.Identity)):
                return super().forward(x, *args, **kwargs)
            lora_A, lora_B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
            base_layer = self.get_base_layer()
            result = base_layer(x)
            if not torch.is_autocast_enabled(x.device.type):
                x = self._cast_input_dtype(x, lora_A.weight.dtype)  # as PEFT: the adapter's dtype without autocast
            lora = lora_B(lora_A(x)).to(result.dtype)
            if dora is None:
                return result.add(lora, alpha=scaling)
            scale = (dora.weight / dora.row_norm(base_layer.weight, lora_A, lora_B, scaling)).view(1, -1)  # fp32 (out,)
            bias = base_layer.bias
            if bias is None:
                return (result.add(lora, alpha=scaling) * scale).to(result.dtype)
            return ((result - bias).add(lora, alpha=scaling) * scale + bias).to(result.dtype)

    return LeanLoraLinear


def use_lean_forward(model: Any) -> int:
    """Swap PEFT's `lora.Linear` and `DoraLinearLayer` modules in `model` for the lean classes (module docstring), in
    place; returns how many linear layers were swapped (0 when already done or there are none)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import Linear

    dora_cls, linear_cls = _factored_layer_class(), _lean_linear_class()
    n = 0
    for module in model.modules():
        if type(module) is DoraLinearLayer:
            module.__class__ = dora_cls
        elif type(module) is Linear:
            module.__class__ = linear_cls
            n += 1
    return n


def exact_dora_magnitude(model: Any) -> int:
    """Set each DoRA magnitude of `model`'s lean layers to ||W + sBA|| in fp32, the forward's own norm (module
    docstring); for a freshly created adapter only (an adapter loaded to go on training keeps its trained m).
    Returns how many magnitude vectors were set."""
    import torch

    linear_cls = _lean_linear_class()
    n = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not linear_cls:
                continue
            for name, dora in module.lora_magnitude_vector.items():
                base_layer = module.get_base_layer()
                if isinstance(dora, _factored_layer_class()) and dora.factored(base_layer):
                    norm = dora.row_norm(base_layer.weight, module.lora_A[name], module.lora_B[name], module.scaling[name])
                    dora.weight.data = norm.to(dora.weight.dtype).clone()  # never the kept norm's own storage
                    n += 1
    return n
