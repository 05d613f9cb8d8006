"""BERT layers at inference: the same numbers as transformers' `BertLayer`, with less Python around them.

One `BertLayer` call in eval mode passes through six modules, keyword-argument plumbing, the attention registry
and `apply_chunking_to_forward` (which inspects the feed-forward's signature on every call). For one sentence of
~45 characters on the default encoder (4 x 256, bf16) that overhead was about as large as the arithmetic:
1.7 ms for the four layers against 1.0 ms here. `forward` does the layer's arithmetic in one function, with
query, key and value from one matmul over their concatenated weights: the same dot products, so the same
numbers (the tests compare it with `BertLayer` bit for bit, fp32 and bf16, padded or not).

It applies only where it computes exactly what the layer would (`applies`): no autograd (`torch.no_grad`,
`inference_mode`), eval mode, plain `nn.Linear` projections (not the int8 ones of `quantize_linear`), exact GELU,
SDPA attention, an encoder layer (no decoder, no cross-attention), no feed-forward chunking. Anything else calls
the layer itself, so training is untouched. The concatenated weights are kept on the attention module and rebuilt
when one of the six tensors changes (its storage or its version counter); nothing is saved with a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tasks_mtl import fast_dropout

_QKV = "_mtl_qkv"  # attribute of a BertSelfAttention: (key of its six tensors, weight, bias)


def applies(layer: nn.Module) -> bool:
    """Whether `forward` computes exactly what `layer(hidden, mask)` would, here and now."""
    if layer.training or torch.is_grad_enabled():
        return False
    attention, output = layer.attention, layer.output
    act = getattr(layer.intermediate.intermediate_act_fn, "act", None)
    linears = (attention.self.query, attention.self.key, attention.self.value, attention.output.dense,
               layer.intermediate.dense, output.dense)
    return (not layer.is_decoder and not getattr(layer, "add_cross_attention", False)
            and layer.chunk_size_feed_forward == 0
            and attention.self.config._attn_implementation in ("sdpa", fast_dropout.ATTENTION)
            and act is F.gelu
            and all(type(m) is nn.Linear and m.bias is not None for m in linears)
            and type(attention.output.LayerNorm) is nn.LayerNorm and type(output.LayerNorm) is nn.LayerNorm)


def _qkv(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The query, key and value weights and biases concatenated (3H x H, 3H), cached until one of them changes."""
    parts = [attention.query, attention.key, attention.value]
    tensors = [t for m in parts for t in (m.weight, m.bias)]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = attention.__dict__.get(_QKV)
    if cached is None or cached[0] != key:
        weight = torch.cat([m.weight for m in parts]).contiguous()
        bias = torch.cat([m.bias for m in parts]).contiguous()
        cached = (key, weight, bias)
        attention.__dict__[_QKV] = cached  # a plain attribute: not a parameter or buffer, never saved
    return cached[1], cached[2]


def forward(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`layer(hidden, mask)` of a `BertLayer` for which `applies` holds; `mask` is the SDPA mask `encode` builds."""
    attention = layer.attention.self
    batch, length, _ = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    weight, bias = _qkv(attention)
    q, k, v = F.linear(hidden, weight, bias).view(batch, length, 3 * heads, size).transpose(1, 2).split(heads, 1)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling)
    context = context.transpose(1, 2).reshape(batch, length, heads * size)
    out = layer.attention.output
    hidden = _norm(out.LayerNorm, F.linear(context, out.dense.weight, out.dense.bias) + hidden)
    inner, out = layer.intermediate.dense, layer.output
    return _norm(out.LayerNorm, F.linear(F.gelu(F.linear(hidden, inner.weight, inner.bias)), out.dense.weight,
                                         out.dense.bias) + hidden)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def run(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`forward` where it `applies`, else the layer itself."""
    return forward(layer, hidden, mask) if applies(layer) else layer(hidden, mask)
