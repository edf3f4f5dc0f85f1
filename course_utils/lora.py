"""Week 5: LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), from scratch.

A frozen linear layer W (out, in) learns only a low-rank update:
    y = x W^T + (alpha / r) * x A^T B^T,   A (r, in), B (out, r),
with B initialised to zero (so training starts exactly at the pretrained model) and A random
(Kaiming-uniform, as the paper's code and PEFT). Reading order: `LoRALinear` -> `apply_lora` (wrap the
named linear layers of a model, freeze the rest) -> `merge_lora` / `unmerge_lora` (fold the update into
W for inference at zero extra cost, and take it out again) -> counting trainable parameters by formula
(`lora_param_count`) and by inspection (`count_trainable`) -> `copy_lora_weights` (take A and B from a
PEFT model, so both start identical and can be compared).

PEFT adds dropout on the LoRA branch, many adapters per layer, rsLoRA/DoRA variants, quantized base
layers and saving adapters alone; the core is this file.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update scaled by alpha / r."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if r < 1:
            raise ValueError(f"the rank r must be >= 1, got {r}")
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as PEFT
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """The update as a full matrix, (alpha / r) B A: (out, in)."""
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one matmul per call afterwards, no LoRA branch."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (exact up to float rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A as a new tensor (W unchanged): the weight of a LoRA layer with its update folded in."""
    return weight + scaling * (lora_B @ lora_A)  # (out, r) @ (r, in) -> (out, in)


def apply_lora(model: nn.Module, target_modules: Iterable[str] = ("q_proj", "v_proj"), *, r: int = 8,
               alpha: float = 16.0, layer_cls: type[nn.Module] = LoRALinear) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose name ends in one of `target_modules` in a LoRALinear.

    `layer_cls(base, r, alpha)` builds each wrapper (a learner's own LoRALinear works too).
    Returns the qualified names wrapped. Raises ValueError naming the model's linear layers when a
    target matches none (a typo like "qproj" would otherwise silently train nothing).
    """
    targets = list(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped: list[str] = []
    for t in targets:
        hits = [n for n in linear_names if n == t or n.endswith("." + t)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(f"LoRA target module {t!r} matches no nn.Linear in this model; its linear layers "
                             f"are named {', '.join(short)}")
        for name in hits:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer_cls(getattr(parent, child), r=r, alpha=alpha))
            wrapped.append(name)
    return wrapped


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers of `model` (anything with lora_A and lora_B parameters)."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.Parameter)]


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer of `model` into its base weight."""
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.unmerge()


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with requires_grad=True (each tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def lora_param_count(config, target_modules: Iterable[str], r: int) -> int:
    """Trainable LoRA parameters of a Llama-style model, by formula: n_layers * sum over targets of r (in + out).

    Each wrapped (out, in) layer adds A (r, in) and B (out, r). In a Llama layer with model width d, head
    size hs = d / n_heads, n_kv KV heads and feed-forward width f: q_proj and o_proj are d x d,
    k_proj and v_proj map d -> n_kv * hs, gate_proj and up_proj d -> f, down_proj f -> d.
    """
    d, f = config.hidden_size, config.intermediate_size
    hs = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * hs
    shapes = {"q_proj": (d, config.num_attention_heads * hs), "k_proj": (d, kv), "v_proj": (d, kv),
              "o_proj": (config.num_attention_heads * hs, d), "gate_proj": (d, f), "up_proj": (d, f),
              "down_proj": (f, d)}
    total = 0
    for t in target_modules:
        if t not in shapes:
            raise ValueError(f"unknown Llama module {t!r}; known: {', '.join(shapes)}")
        d_in, d_out = shapes[t]
        total += r * (d_in + d_out)
    return config.num_hidden_layers * total


@torch.no_grad()
def copy_lora_weights(peft_model: nn.Module, model: nn.Module) -> int:
    """Copy PEFT's lora_A / lora_B ("default" adapter) into our LoRALinear layers of the same name.

    Returns how many layers were copied. Both models must wrap the same modules.
    """
    ours = {n: m for n, m in model.named_modules() if isinstance(getattr(m, 'lora_A', None), nn.Parameter)}
    copied = 0
    for name, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict) and "default" in m.lora_A:
            key = name.removeprefix("base_model.model.")
            if key not in ours:
                raise ValueError(f"PEFT wraps {key!r} but our model has no LoRALinear there")
            ours[key].lora_A.copy_(m.lora_A["default"].weight)
            ours[key].lora_B.copy_(m.lora_B["default"].weight)
            copied += 1
    if copied != len(ours):
        raise ValueError(f"copied {copied} layers but our model has {len(ours)} LoRA layers")
    return copied
