"""BERT layers at inference: the same numbers as transformers' `BertLayer`, with less Python around them.

One `BertLayer` call in eval mode passes through six modules, keyword-argument plumbing, the attention registry
and `apply_chunking_to_forward` (which inspects the feed-forward's signature on every call). For one sentence of
~45 characters on the default encoder (4 x 256, bf16) that overhead was about as large as the arithmetic:
1.7 ms for the four layers against 1.0 ms here. `forward` does the layer's arithmetic in one function, with
query, key and value from one matmul over their concatenated weights: the same dot products, so the same
numbers (the tests compare it with `BertLayer` bit for bit, fp32 and bf16, padded or not). bf16 weights on a
CPU are also kept in oneDNN's blocked layout (`_pack`), which `F.linear` otherwise builds on every call.

It applies only where it computes exactly what the layer would (`applies`): a CPU, no autograd (`torch.no_grad`,
`inference_mode`), eval mode, plain `nn.Linear` projections (not the int8 ones of `quantize_linear`), exact GELU,
SDPA attention, an encoder layer (no decoder, no cross-attention), no feed-forward chunking. Anything else calls
the layer itself, so training is untouched. The prepared matmuls are kept on the layer and rebuilt when one of
their weights or biases changes (its storage or its version counter); nothing is saved with a checkpoint.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from tasks_mtl import fast_dropout

_PREPARED = "_mtl_prepared"  # attribute of a BertLayer: (key of its tensors, its four matmuls)


class _Parts(NamedTuple):
    """The modules of a `BertLayer` that `forward` reads."""
    attention: nn.Module  # BertSelfAttention
    query: nn.Module
    key: nn.Module
    value: nn.Module
    out: nn.Module  # attention output dense
    out_norm: nn.Module
    inner: nn.Module  # feed-forward in
    act: nn.Module
    ffn: nn.Module  # feed-forward out
    ffn_norm: nn.Module


def _parts(layer: nn.Module) -> _Parts:
    """Read from the modules' registries directly: `layer.attention.self.query` through `nn.Module.__getattr__`
    costs about a microsecond a step, which made these checks cost as much as a layer's attention."""
    children = layer._modules
    attention, intermediate, output = (children[n]._modules for n in ("attention", "intermediate", "output"))
    attention_self, attention_out = attention["self"], attention["output"]._modules
    inner = attention_self._modules
    return _Parts(attention_self, inner["query"], inner["key"], inner["value"], attention_out["dense"],
                  attention_out["LayerNorm"], intermediate["dense"], intermediate["intermediate_act_fn"],
                  output["dense"], output["LayerNorm"])


def applies(layer: nn.Module) -> _Parts | None:
    """The layer's parts when `forward` computes exactly what `layer(hidden, mask)` would, here and now; else None."""
    if layer.training or torch.is_grad_enabled():
        return None
    parts = _parts(layer)
    linears = (parts.query, parts.key, parts.value, parts.out, parts.inner, parts.ffn)
    exact = (not layer.is_decoder and not getattr(layer, "add_cross_attention", False)
             and layer.chunk_size_feed_forward == 0
             and parts.attention.config._attn_implementation in ("sdpa", fast_dropout.ATTENTION)
             and getattr(parts.act, "act", None) is F.gelu
             and all(type(m) is nn.Linear and m.bias is not None for m in linears)
             and type(parts.out_norm) is nn.LayerNorm and type(parts.ffn_norm) is nn.LayerNorm
             # compared with BertLayer on a CPU only: a GPU may pick another matmul algorithm for the 3H-wide QKV
             and parts.ffn.weight.device.type == "cpu")
    return parts if exact else None


class _Linear(NamedTuple):
    """A Linear layer's weight and bias ready to apply: `packed` means oneDNN's blocked layout (`_pack`)."""
    weight: torch.Tensor
    bias: torch.Tensor
    packed: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor, bias: torch.Tensor) -> _Linear:
    """A bf16 weight on a CPU is reordered once into oneDNN's blocked layout, the one `F.linear` reorders it into on
    every call (same kernel, so the same numbers; the tests compare): 8-38 us less per matmul for one sentence (measured warm and cache-cold)."""
    packed = (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and _onednn_bf16())
    return _Linear(torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight, bias, packed)


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls here (where it does not, `F.linear` takes another kernel: no packing)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight") and bool(ops._is_mkldnn_bf16_supported()))


def _prepared(layer: nn.Module, parts: _Parts) -> tuple[_Linear, _Linear, _Linear, _Linear]:
    """The layer's four matmuls (query, key and value concatenated: 3H x H; attention output; feed-forward in and
    out), cached on the layer until one of their weights or biases changes (storage, version counter, dtype)."""
    linears = (parts.query, parts.key, parts.value, parts.out, parts.inner, parts.ffn)
    tensors = [t for m in linears for t in (m._parameters["weight"], m._parameters["bias"])]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = layer.__dict__.get(_PREPARED)
    if cached is None or cached[0] != key:
        qkv = _pack(torch.cat(tensors[0:6:2]), torch.cat(tensors[1:6:2]))
        cached = (key, (qkv, *(_pack(m.weight, m.bias) for m in linears[3:])))
        layer.__dict__[_PREPARED] = cached  # a plain attribute: not a parameter or buffer, never saved
    return cached[1]


def forward(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, parts: _Parts | None = None
            ) -> torch.Tensor:
    """`layer(hidden, mask)` of a `BertLayer` for which `applies` holds (`parts`: what it returned); `mask` is the
    SDPA mask `encode` builds."""
    parts = parts or _parts(layer)
    attention = parts.attention
    batch, length, _ = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    qkv, out, inner, ffn = _prepared(layer, parts)
    q, k, v = qkv(hidden).view(batch, length, 3 * heads, size).transpose(1, 2).split(heads, 1)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scaling)
    hidden = _norm(parts.out_norm, out(context.transpose(1, 2).reshape(batch, length, -1)) + hidden)
    return _norm(parts.ffn_norm, ffn(F.gelu(inner(hidden))) + hidden)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def run(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`forward` where it `applies`, else the layer itself."""
    parts = applies(layer)
    return forward(layer, hidden, mask, parts) if parts is not None else layer(hidden, mask)
