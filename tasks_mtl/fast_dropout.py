"""Dropout whose mask costs a fifth of torch's on a CPU: the training step's largest cost after the matmuls.

torch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`, about 4 ns each): on the default
encoder (4 x 256, ~60-token rows, 32 rows) its 14 dropouts took a fifth of a training step, as much as
every Linear layer's forward. Here the mask comes from 64-bit random words cut into four 16-bit lanes
(`Tensor.random_` over the whole int64 range), each lane kept when it clears a threshold: the same
Bernoulli(1 - p) mask per element, with p rounded to a multiple of 1/65,536 (0.1 -> 0.100006), drawn from
torch's generator (so `torch.manual_seed` still fixes a run) in about a sixth of the time.

`install(module)` swaps every `nn.Dropout` under `module` for `FastDropout` (same p, same train/eval
behaviour) and routes a BERT's attention through `attention`: torch's fused attention (SDPA) when no dropout
applies (evaluation, prediction: unchanged outputs) and on a GPU (whose SDPA and dropout are fused), else
the same arithmetic written out with this mask on the attention probabilities (SDPA on a CPU takes that
unfused path anyway once dropout is on). Nothing of
this is saved: checkpoints stay plain BERT weights and config.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION = "mtl_sdpa"  # the attention implementation's name in transformers' registries
LANES = 4  # 16-bit lanes per 64-bit random word


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p (p rounded to 1/65,536)."""
    n = math.prod(shape)
    words = torch.empty((n + LANES - 1) // LANES, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over -32,768..32,767
    return lanes >= -32768 + round(p * 65536)


class _Dropout(torch.autograd.Function):
    """x * mask, the mask already in x's dtype and scaled by 1 / (1 - p): one multiplication each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        scale = torch.tensor(1.0 / (1.0 - p), dtype=x.dtype, device=x.device)
        # bool -> bf16 has no vectorised CPU kernel (840 us for a 32 x 128 x 256 mask by `torch.where`), uint8 -> bf16
        # has: 0 or 1 as bytes, then times the scale (130 us), the same values bit for bit
        mask = keep_mask(x.shape, p, x.device).view(torch.uint8).to(x.dtype).mul_(scale)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`torch.nn.functional.dropout` with `keep_mask`'s mask on a CPU (torch's own elsewhere: fused on a GPU)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != "cpu":
        return nn.functional.dropout(x, p, training)
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with `keep_mask`'s mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention contract ((B, heads, T, d) inputs -> (B, T, heads, d), weights): SDPA without
    dropout, else softmax(q k^T * scaling + mask) with `keep_mask` dropout, times v."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or not module.training or query.device.type != "cpu":  # a GPU's SDPA fuses dropout
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout if module.training else 0.0, scaling=scaling, **kwargs)
    scaling = scaling if scaling is not None else query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # SDPA's mask: bool (True = attend) or additive
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _Dropout.apply(torch.softmax(scores, dim=-1), dropout)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `ATTENTION` known to transformers (attention and mask registries; the mask is SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def install(module: nn.Module) -> nn.Module:
    """Swap `module`'s dropouts for `FastDropout`, and a BERT's SDPA attention for `attention`."""
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Dropout:
                setattr(child, attr, FastDropout(sub.p, sub.inplace))
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        register()
        config._attn_implementation = ATTENTION
    return module
