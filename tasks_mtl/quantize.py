"""Dynamic int8 Linear layers for CPU serving (`mtl serve --quantize`, `Predictor.from_dir(..., quantize=True)`)."""

from __future__ import annotations

import torch


def quantize_linear(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every nn.Linear replaced by a dynamically quantised int8 one (CPU inference only;
    embeddings, LayerNorm and the CRF stay fp32). torch.ao.quantization is deprecated in favour of torchao,
    which this project does not install; the call still works in the pinned torch."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)  # the same deprecation, per layer
        return torch.ao.quantization.quantize_dynamic(model.cpu().eval(), {torch.nn.Linear}, dtype=torch.qint8)
