"""tasks_mtl.fast_encoder: at inference a BERT layer's arithmetic in one function gives transformers' `BertLayer`
outputs bit for bit (fp32 and bf16, padded or not), follows weight changes, and steps aside wherever it would not
compute the same thing (autograd, training mode, int8 layers, eager attention)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from tasks_mtl import fast_dropout, fast_encoder


def _bert(hidden: int = 64, heads: int = 4, attn: str = "sdpa") -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=80, attn_implementation=attn)
    return fast_dropout.install(BertModel(config, add_pooling_layer=False)).eval()


def _inputs(bert: BertModel, padded: bool, rows: int = 3, length: int = 45):
    ids = torch.randint(1, 60, (rows, length))
    attention = torch.ones(rows, length, dtype=torch.long)
    if padded:
        attention[0, 30:] = 0
        attention[2, 5:] = 0
    hidden = bert.embeddings(input_ids=ids)
    return hidden, attention


def _hidden_states(bert: BertModel, hidden: torch.Tensor, attention: torch.Tensor, fast: bool) -> list[torch.Tensor]:
    mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=attention)
    states = [hidden]
    for layer in bert.encoder.layer:
        states.append(fast_encoder.forward(layer, states[-1], mask) if fast else layer(states[-1], mask))
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_it_gives_the_layers_outputs_bit_for_bit(dtype, padded, rows):
    bert = _bert()
    bert.encoder.to(dtype)
    with torch.inference_mode():
        hidden, attention = _inputs(bert, padded and rows > 1, rows)
        hidden = hidden.to(dtype)
        assert all(fast_encoder.applies(layer) for layer in bert.encoder.layer)
        expected = _hidden_states(bert, hidden, attention, fast=False)
        got = _hidden_states(bert, hidden, attention, fast=True)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and torch.equal(g, e)
    if dtype == torch.bfloat16 and fast_encoder._onednn_bf16():  # the prepacked weights were used (as on CI)
        assert all(m.packed for layer in bert.encoder.layer for m in fast_encoder._prepared(layer, fast_encoder._parts(layer)))


def test_the_model_encodes_with_it_at_inference_and_with_the_layers_under_autograd():
    from tasks_mtl.config import TaskConfig
    from tasks_mtl.model import MultiTaskModel

    bert = _bert()
    model = MultiTaskModel(bert, {"sentiment": TaskConfig(type="classification", bundled="sentiment", labels=["0", "1"])}).eval()
    calls = []
    for layer in model.bert.encoder.layer:
        layer.register_forward_hook(lambda *_: calls.append(1))
    _, attention = _inputs(bert, padded=True)
    ids = torch.randint(1, 60, (3, 45))
    batch = {"input_ids": ids, "attention_mask": attention}
    with torch.inference_mode():
        fast = model.encode(batch, 2)[0]
    assert calls == []  # no BertLayer call: the fast path ran
    with torch.no_grad():
        assert torch.equal(model.encode(batch, 2)[0][-1], fast[-1])
    assert calls == []
    tracked = model.encode(batch, 2)[0][-1]  # autograd on: the layers themselves, and a graph to train through
    assert len(calls) == 2 and tracked.requires_grad
    assert torch.equal(tracked.detach(), fast[-1])
    model.train()
    with torch.no_grad():
        model.encode(batch, 2)
    assert len(calls) == 4  # training mode (dropout): the layers


def test_it_follows_weight_changes_and_dtype_casts():
    bert = _bert()
    layer = bert.encoder.layer[0]
    with torch.inference_mode():
        hidden, attention = _inputs(bert, padded=True)
    mask = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=attention)
    with torch.no_grad():
        fast_encoder.forward(layer, hidden, mask)  # fills the cache
        layer.attention.self.value.weight.mul_(2)  # in place, as an optimizer step or load_state_dict does
        assert torch.equal(fast_encoder.forward(layer, hidden, mask), layer(hidden, mask))
        layer.attention.self.key.bias.add_(0.5)
        assert torch.equal(fast_encoder.forward(layer, hidden, mask), layer(hidden, mask))
        layer.to(torch.bfloat16)
        low = hidden.to(torch.bfloat16)
        assert fast_encoder.forward(layer, low, mask).dtype == torch.bfloat16
        assert torch.equal(fast_encoder.forward(layer, low, mask), layer(low, mask))
    assert "_mtl_prepared" not in "".join(bert.state_dict())  # the cache is no parameter or buffer: never saved


def test_it_steps_aside_for_int8_layers_eager_attention_and_other_devices():
    from tasks_mtl.quantize import quantize_linear

    quantized = quantize_linear(_bert())
    eager = _bert(attn="eager")
    with torch.inference_mode():
        assert not any(fast_encoder.applies(layer) for layer in quantized.encoder.layer)
        assert not any(fast_encoder.applies(layer) for layer in eager.encoder.layer)
        assert fast_encoder.applies(_bert().encoder.layer[0])
        meta = _bert().to("meta")  # another device than the CPU it was compared on
        assert not fast_encoder.applies(meta.encoder.layer[0])
