"""Week 4: what a GPT costs, from formulas that the code checks against the model itself.

Reading order: parameters (per part) -> FLOPs per token (forward, training) -> training memory
(weights, gradients, AdamW state, activations) -> measuring: FLOPs with torch's counter, the
activations autograd keeps, the peak memory of a real training step -> the device's peak FLOP/s
-> speed: the time of one step, CPU threads, tokens/s against transformers' GPT-2 -> model FLOPs
utilisation (MFU, Chowdhery et al. 2022, appendix B).

Conventions: a multiply-add is 2 FLOPs; a backward pass costs twice the forward (one matmul for the
input's gradient, one for the weight's), so training costs 3x the forward. Attention scores are
counted for all T x T pairs, as torch's FLOP counter does (a causal kernel could skip half).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import alternating_seconds, autocast, pick_cpu_threads
from .transformer import GPT, GPTConfig


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def param_count(cfg: GPTConfig) -> dict[str, int]:
    """Parameters of `GPT(cfg)` per part, from the config alone; "total" counts a tied matrix once."""
    C, H, V, L = cfg.n_embd, cfg.hidden, cfg.vocab_size, cfg.n_layer
    norm = 2 * C if (cfg.norm == "layernorm" and cfg.bias) else C  # weight (+ bias)
    attention = 4 * C * C + (4 * C if cfg.bias else 0)  # W_q, W_k, W_v, W_o (+ biases)
    mlp = 3 * C * H if cfg.mlp == "swiglu" else 2 * C * H + ((H + C) if cfg.bias else 0)
    parts = {
        "token_embedding": V * C,
        "position_embedding": cfg.block_size * C,
        "attention": L * attention,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * norm,
        "lm_head": 0 if cfg.tie_weights else V * C,  # tied: the token embedding matrix, already counted
    }
    parts["total"] = sum(parts.values())
    parts["non_embedding"] = parts["total"] - parts["token_embedding"] - parts["position_embedding"]
    return parts


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def flops_per_token(cfg: GPTConfig, *, seq_len: int | None = None, training: bool = False) -> int:
    """Matmul FLOPs per token of one forward pass (x3 with `training`) at context length `seq_len`.

    Per layer: 2 (4 C^2) for the four attention projections, 2 k C H for the feed-forward layer (k = 2
    matrices for GELU, 3 for SwiGLU), and 2 (2 T C) for the scores Q K^T and the weighted sum of V;
    then 2 C V for the output layer. Embedding look-ups, norms and softmaxes cost O(C), not counted.
    """
    T = cfg.block_size if seq_len is None else seq_len
    C, H, V, L = cfg.n_embd, cfg.hidden, cfg.vocab_size, cfg.n_layer
    k = 3 if cfg.mlp == "swiglu" else 2
    forward = 2 * (L * (4 * C * C + k * C * H) + C * V) + L * 4 * T * C
    return 3 * forward if training else forward


def measure_flops_per_token(model: nn.Module, batch_size: int = 1, seq_len: int | None = None, *,
                            training: bool = False) -> float:
    """FLOPs per token that `torch.utils.flop_counter` counts in model(x) (and backward with `training`).

    The counter knows matmuls, not the fused attention kernel, so the model is run with week 3's
    explicit attention for the count (same arithmetic, no fused kernel).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    T = cfg.block_size if seq_len is None else seq_len
    device = next(model.parameters()).device
    x = torch.randint(0, cfg.vocab_size, (batch_size, T), device=device)
    fused = [m for m in model.modules() if getattr(m, "fused", False)]
    for m in fused:
        m.fused = False
    try:
        with FlopCounterMode(display=False) as counter:
            logits = model(x)
            if training:
                logits.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
    finally:
        for m in fused:
            m.fused = True
    return counter.get_total_flops() / (batch_size * T)


# ----------------------------------------------------------------------------------------------
# Training memory
# ----------------------------------------------------------------------------------------------
def activation_elements_per_token(cfg: GPTConfig, seq_len: int | None = None) -> dict[str, int]:
    """Numbers autograd keeps for the backward pass, per token (dropout 0), by where they are kept.

    Per layer: each of our two norms keeps its centred input, 1/rms and the normalised output
    (2 C + 1); attention keeps its input, q, k, v (4 C) and either the output and one log-sum-exp per
    head (fused kernel: C + nh) or the T weights per head (week 3's explicit softmax: nh T) plus the
    merged heads (C); the feed-forward layer keeps its input and its hidden activations (C + 2 H for
    GELU; C + 4 H for SwiGLU: gate, silu(gate), up and their product). At the end: the final norm,
    the output layer's input and the log-softmax of the logits (3 C + 1 + V).
    """
    T = cfg.block_size if seq_len is None else seq_len
    C, H, V, L, nh = cfg.n_embd, cfg.hidden, cfg.vocab_size, cfg.n_layer, cfg.n_head
    norms = 2 * (2 * C + 1)
    attention = 4 * C + (C + nh if cfg.fused_attention else nh * T + C)
    mlp = C + (4 * H if cfg.mlp == "swiglu" else 2 * H)
    parts = {"norms": L * norms, "attention": L * attention, "mlp": L * mlp, "head": 3 * C + 1 + V}
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class MemoryEstimate:
    """Bytes of one training step with AdamW (fp32 master weights)."""

    weights: int  # fp32 parameters (plus 16-bit copies under autocast)
    gradients: int  # one fp32 gradient per parameter
    adamw_state: int  # two fp32 moments per parameter
    activations: int  # what autograd keeps between forward and backward

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.adamw_state + self.activations

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "adamw_state": self.adamw_state,
                "activations": self.activations, "total": self.total}


def training_memory(cfg: GPTConfig, batch_size: int, *, seq_len: int | None = None,
                    precision: str = "fp32") -> MemoryEstimate:
    """Estimated bytes to train `GPT(cfg)` on (batch_size, seq_len) windows with AdamW.

    Weights, gradients and the two AdamW moments are fp32 (16 bytes per parameter). In fp16/bf16
    autocast the matmuls also keep 16-bit copies of the weights (2 bytes per parameter); activations
    are counted at 4 bytes each in every precision, an upper bound for mixed precision.
    """
    n = param_count(cfg)["total"]
    T = cfg.block_size if seq_len is None else seq_len
    copies = 2 * n if precision in ("fp16", "bf16") else 0
    acts = 4 * batch_size * T * activation_elements_per_token(cfg, T)["total"]
    return MemoryEstimate(weights=4 * n + copies, gradients=4 * n, adamw_state=8 * n, activations=acts)


def saved_activation_bytes(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves while running `loss_fn()` (parameters and duplicates excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(seen.values())


def _rss_peak_bytes() -> tuple[int, int]:
    """(peak, current) resident memory of this process from /proc (Linux)."""
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    now = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    return peak, now


def measure_peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak extra memory in bytes while fn() runs: CUDA's allocator counter, or on CPU the resident-set peak.

    On CPU (Linux with glibc) C's allocator is told to give every block of 64 KiB or more its own pages
    and to return them when freed (`mallopt`), so the resident size follows the live tensors; the
    kernel's peak counter is reset first (`/proc/self/clear_refs`). Run one small step before measuring:
    the first step in a process also loads kernels and thread pools (tens of MB).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("measuring peak CPU memory needs Linux (/proc/self/clear_refs); use a GPU or skip this cell")
    libc = None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)  # hand memory freed earlier back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    _, before = _rss_peak_bytes()
    try:
        fn()
        peak, _ = _rss_peak_bytes()
    finally:
        if libc is not None:  # back to about glibc's steady state: reuse blocks below 32 MiB
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)
    return peak - before


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h


# ----------------------------------------------------------------------------------------------
# The device's peak, for model FLOPs utilisation
# ----------------------------------------------------------------------------------------------
# Dense peak FLOP/s from the vendors' data sheets (tensor cores, 16-bit; no sparsity).
GPU_PEAK_FLOPS = {"T4": 65e12, "V100": 125e12, "A10": 125e12, "L4": 121e12, "A100": 312e12, "H100": 989e12,
                  "H200": 989e12}


def measured_matmul_flops(n: int = 2048, seconds: float = 2.0, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest (n x n) @ (n x n) product in `seconds` of trying: a practical peak for this device.

    The best of many tries, because on a shared machine most tries are slowed by other programs.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    cuda = torch.device(device).type == "cuda"
    a @ b  # warm-up
    best, tries, begin = float("inf"), 0, time.perf_counter()
    while tries < 3 or time.perf_counter() - begin < seconds:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
        tries += 1
    return 2 * n ** 3 / best


def peak_flops(device: torch.device | str = "cpu", precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, where it came from): a data-sheet value for known GPUs, else a measured large matmul."""
    device = torch.device(device)
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} data sheet ({precision})"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    return measured_matmul_flops(device=device, dtype=dtype), f"measured {precision} 2048x2048 matmul on {device}"


# ----------------------------------------------------------------------------------------------
# Speed: time a step, choose CPU threads, compare with transformers' GPT-2
# ----------------------------------------------------------------------------------------------
def seconds_per_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 3) -> float:
    """Median wall time of one training step (forward, backward, AdamW) on a copy of `model`, after a warm-up."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(net.parameters())
    device = next(net.parameters()).device
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with autocast(device):
            logits = net(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def pick_training_threads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """On a CPU, time a training step with 1 thread and with every core, keep the faster (`runtime.pick_cpu_threads`)."""
    return pick_cpu_threads(lambda: seconds_per_step(model, x, y, repeats=1), repeats=1,
                            device=next(model.parameters()).device)


def throughput_vs_hf_gpt2(cfg: GPTConfig, batch_size: int, *, steps: int = 10,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """Training tokens/s of our GPT and of `transformers`' GPT2LMHeadModel of the same size, side by side.

    Both start from random weights (no download), train on the same random batch with the same loss,
    torch.optim.AdamW and the runtime's precision; their steps alternate, so a busy machine slows both alike.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if not (cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias and cfg.tie_weights):
        raise ValueError("the comparison needs a GPT-2-shaped config (layernorm, gelu, bias, tied weights)")
    device = torch.device(device)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=0, eos_token_id=0)
    models = {"ours": GPT(cfg).to(device), "transformers": GPT2LMHeadModel(hf_cfg).to(device)}
    forward = {"ours": lambda m, x: m(x), "transformers": lambda m, x: m(x).logits}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)

    def train_step(name: str) -> None:
        with autocast(device):
            logits = forward[name](models[name], x)
        F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    timed = alternating_seconds({k: (lambda k=k: train_step(k)) for k in models}, rounds=steps, device=device)
    seconds = {k: sum(v) for k, v in timed.items()}
    tokens = steps * batch_size * cfg.block_size
    out = {f"{k}_tokens_per_s": tokens / v for k, v in seconds.items()}
    out["ratio"] = out["ours_tokens_per_s"] / out["transformers_tokens_per_s"]
    out["params_ours"] = float(models["ours"].num_params())
    out["params_transformers"] = float(sum(p.numel() for p in models["transformers"].parameters()))
    return out


def mfu(tokens_per_second: float, cfg: GPTConfig, peak: float, seq_len: int | None = None) -> float:
    """Model FLOPs utilisation: training FLOPs per second achieved / the device's peak."""
    return tokens_per_second * flops_per_token(cfg, seq_len=seq_len, training=True) / peak
