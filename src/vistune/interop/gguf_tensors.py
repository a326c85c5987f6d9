"""Tensors into GGUF: the storage type of each tensor for an ``--outtype``, and the conversion.

    f32    every tensor float32
    f16    matrices float16; vectors (norms, biases) float32
    bf16   matrices bfloat16; vectors float32
    q8_0   matrices whose rows are a multiple of 32 long in llama.cpp's Q8_0 blocks,
           other matrices float16; vectors float32

``keep_f16`` names tensors that llama.cpp reads as float (the patch-embedding
convolution, position embeddings): they are never quantized, at most float16.
"""
from __future__ import annotations

import numpy as np
import torch

from .weights import InteropError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_0_BLOCK = 32


def require_gguf():
    """The `gguf` package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise InteropError("GGUF export needs the `gguf` package: pip install 'vistune[gguf]' (or pip install gguf)") \
            from None
    return gguf


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise InteropError(f"unknown GGUF outtype {outtype!r}; one of {', '.join(OUTTYPES)}")


def file_type(outtype: str) -> int:
    """general.file_type for ``outtype`` (llama.cpp's LlamaFileType numbers)."""
    gguf = require_gguf()
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def storage_type(shape: tuple[int, ...], outtype: str, *, float_only: bool = False):
    """The GGMLQuantizationType a tensor of ``shape`` is stored as under ``outtype``."""
    gguf = require_gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return q.F32
    if outtype == "bf16" and not float_only:
        return q.BF16
    if outtype == "q8_0" and not float_only and shape[-1] % Q8_0_BLOCK == 0:
        return q.Q8_0
    return q.F16


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().contiguous().numpy()


def add_tensor(writer, name: str, t: torch.Tensor | np.ndarray, outtype: str, *, float_only: bool = False) -> None:
    """Add one tensor to a GGUFWriter, converted to its storage type."""
    gguf = require_gguf()
    data = t if isinstance(t, np.ndarray) else to_numpy(t)
    data = np.ascontiguousarray(data, dtype=np.float32)
    qtype = storage_type(tuple(data.shape), outtype, float_only=float_only)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
