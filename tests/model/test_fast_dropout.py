"""The CPU dropout of tasks_mtl.fast_dropout: the same Bernoulli mask torch's dropout draws (keep share, every lane
of the random words, scale, gradient), reproducible from the seed, and a BERT whose attention runs through it
gives SDPA's outputs when no dropout applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from tasks_mtl import fast_dropout
from tasks_mtl.fast_dropout import FastDropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_keeps_one_minus_p_in_every_lane_of_the_random_words(p):
    torch.manual_seed(0)
    keep = keep_mask((250_000, 4), p)  # column j = lane j of each 64-bit word
    assert keep.dtype == torch.bool
    shares = keep.float().mean(0)
    # 250k draws per lane: the binomial's standard deviation is < 0.001; a lane whose sign bit never varies
    # (int64 random_() without the negative half) would keep 1.0 or 2 * (1 - p) - 1
    assert torch.allclose(shares, torch.full((4,), 1 - p), atol=0.005), shares
    assert keep_mask((7, 3), 0.0).all()


def test_keep_mask_is_reproducible_from_the_seed_and_differs_between_draws():
    torch.manual_seed(3)
    first, second = keep_mask((64, 33), 0.1), keep_mask((64, 33), 0.1)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 33), 0.1), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_what_it_keeps_and_its_gradient_follows_the_same_mask(dtype):
    torch.manual_seed(1)
    x = (torch.rand(40, 50) + 1).to(dtype).requires_grad_()
    y = dropout(x, 0.25)
    kept = y != 0
    assert 0.70 < kept.float().mean() < 0.80
    assert torch.allclose(y[kept].float(), (x[kept] / 0.75).float(), rtol=1e-2)
    weights = torch.randn(40, 50).to(dtype)
    (y * weights).sum().backward()
    expected = torch.where(kept, weights.float() / 0.75, torch.zeros(()))
    assert torch.allclose(x.grad.float(), expected, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_is_x_times_the_scale_in_x_dtype_where_keep_mask_keeps_bit_for_bit(dtype):
    """The mask is built from bytes for speed; its values must be exactly where(keep, 1 / (1 - p) in x's dtype, 0),
    forward and backward (p = 0.1: the scale 1.11... rounds differently in bf16 and fp32)."""
    x = torch.randn(8, 37, 64).to(dtype).requires_grad_()
    torch.manual_seed(5)
    y = dropout(x, 0.1)
    torch.manual_seed(5)
    scale = torch.tensor(1 / 0.9, dtype=dtype)
    mask = torch.where(keep_mask(x.shape, 0.1), scale, torch.zeros((), dtype=dtype))
    assert torch.equal(y, x.detach() * mask) and y.dtype == dtype
    grad = torch.randn(8, 37, 64).to(dtype)
    y.backward(grad)
    assert torch.equal(x.grad, grad * mask)


def test_fast_dropout_module_is_the_identity_in_eval_and_drops_in_training():
    layer = FastDropout(0.3)
    x = torch.randn(5, 6)
    assert torch.equal(layer.eval()(x), x)
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    torch.manual_seed(2)
    assert (layer.train()(x) == 0).any()


def _bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, attn_implementation="sdpa")
    return BertModel(config, add_pooling_layer=False)


def test_installed_bert_matches_sdpa_without_dropout_and_with_an_all_keeping_mask(tmp_path):
    plain, fast = _bert(), _bert()
    fast_dropout.install(fast)
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert fast.config._attn_implementation == fast_dropout.ATTENTION
    ids = torch.randint(1, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0  # padding: the written-out path must mask it as SDPA does
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = plain.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(fast.eval()(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-6)
        # training mode with p so small that no element is dropped: the written-out attention, not SDPA
        for module in fast.modules():
            if isinstance(module, nn.Dropout):
                module.p = 1e-9
            if hasattr(module, "dropout") and isinstance(module.dropout, nn.Dropout):
                module.dropout.p = 1e-9
        calls = []
        original = fast_dropout.attention

        def counted(*args, **kwargs):
            calls.append(kwargs.get("dropout"))
            return original(*args, **kwargs)

        from transformers import AttentionInterface

        AttentionInterface.register(fast_dropout.ATTENTION, counted)
        try:
            trained = fast.train()(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            AttentionInterface.register(fast_dropout.ATTENTION, original)
    assert calls and all(p == 1e-9 for p in calls)
    real = mask.bool()
    assert torch.allclose(trained[real], expected[real], atol=1e-5)
    fast.save_pretrained(tmp_path)  # nothing of the swap is saved: a plain BertModel loads it
    assert fast_dropout.ATTENTION not in (tmp_path / "config.json").read_text()
    loaded = BertModel.from_pretrained(tmp_path, add_pooling_layer=False).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, expected, atol=1e-6)


def test_the_project_model_uses_it_everywhere(tiny_tokenized):
    from tasks_mtl.model import new_model
    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    cfg = tiny_tokenized
    tokenized = cfg.path(cfg.data.tokenized_dir)
    model = new_model(cfg, load_tokenizer(tokenized / TOKENIZER_DIR), NgramTables.load(tokenized))
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert sum(isinstance(m, FastDropout) for m in model.modules()) > cfg.encoder.layers * 2
    assert model.bert.config._attn_implementation == fast_dropout.ATTENTION
