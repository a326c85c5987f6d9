"""Bounds for comparing two computations that are equal in exact arithmetic but round differently.

CPU kernels sum in an order that depends on the ISA (AMX, AVX-512, AVX2, plain), the thread count
and the kernel chosen, so two code paths, or one path on two machines, agree only up to rounding.
Every bound here follows from the dtype's unit roundoff and the shape of the computation, not from
what one machine happened to give, and a test says in a line which one applies and why.

- ``reordered``: values computed through ``depth`` layers of sums of ``terms`` products each, in
  another order. A reordered sum of n terms moves by at most (n-1)·u·Σ|x| (u = eps/2); rounding
  errors are random in practice and grow as √n (Higham, Accuracy and Stability of Numerical
  Algorithms, §3.1). We allow 8·√n·eps per layer, relative to the values' scale, layers adding up.
- ``adam_trained``: weights that two runs trained with Adam(W) from the same start, their gradients
  reordered. Adam's step is lr·m/(√v+ε), about ±lr wherever a gradient is tiny, so a rounding-sized
  change there can move a weight by up to 2·lr per step: elementwise, only that is guaranteed.
"""
from __future__ import annotations

import math

import torch


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def reordered(dtype: torch.dtype = torch.float32, terms: int = 256, depth: int = 1, scale: float = 1.0) -> dict:
    """``rtol``/``atol`` for ``torch.testing.assert_close`` of values of about ``scale`` from ``depth``
    layers of ``terms``-term sums."""
    tol = 8 * depth * math.sqrt(terms) * eps(dtype)
    return {"rtol": tol, "atol": tol * scale}


def assert_reordered(got: torch.Tensor, want: torch.Tensor, terms: int = 256, depth: int = 1,
                     scale: float | None = None, dtype: torch.dtype | None = None) -> None:
    """``got`` and ``want``, the same values computed in another order: each within ``tol`` of itself and
    ``tol`` of ``scale`` (default: the tensor's largest value). Rounding scales with the terms summed,
    not with the result: where a result cancels (a gradient near zero), pass the scale of its terms.
    ``dtype``: the least precise one the computation passes through (default: the result's)."""
    tol = reordered(dtype or want.dtype, terms, depth)["rtol"]
    scale = float(want.detach().abs().max()) if scale is None else scale
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


def assert_grads_reordered(got: list, want: list, terms: int = 256, depth: int = 1) -> None:
    """Two backward passes' gradients (None where a parameter got none), each within the bound of
    ``assert_reordered`` at the scale of the largest gradient: one parameter's gradient may cancel to
    near zero, its terms being as large as any other's."""
    assert [g is None for g in got] == [g is None for g in want]
    scale = max(float(g.detach().abs().max()) for g in want if g is not None)
    for a, b in zip(got, want):
        if b is not None:
            assert_reordered(a, b, terms, depth, scale=scale)


# The suite's tiny models (vistune.model.tiny): two CLIP blocks, a projector, two decoder blocks and
# a head, no sum longer than 256 terms; a forward is about six such layers deep, a backward twice that.
TINY_TERMS, TINY_FORWARD, TINY_BACKWARD = 256, 6, 12


def trained_losses(steps: int, terms: int = TINY_TERMS, depth: int = TINY_FORWARD) -> dict:
    """pytest.approx keywords for the per-step losses of two runs of ``steps`` steps that sum in other
    orders: a forward's bound, once more for every update before the step (each moved the weights by a
    rounding-level amount, bar the few near-zero gradients whose sign it flipped)."""
    return {"rel": reordered(torch.float32, terms, depth)["rtol"] * (steps + 1), "abs": 0.0}


def adam_trained(lr: float, steps: int) -> dict:
    """``rtol``/``atol`` for weights two runs trained with Adam(W) for ``steps`` steps at rate ``lr``."""
    return {"rtol": 0.0, "atol": 2 * lr * steps}


def assert_trained_alike(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Two runs' state dicts: every weight within Adam's elementwise bound, and the two agree far more
    closely overall (a relative Frobenius norm of 1e-3: a wrong update in a whole tensor fails it)."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, **adam_trained(lr, steps), msg=k)
        diff, norm = (got[k].double() - v.double()).norm(), v.double().norm()
        assert diff <= 1e-3 * norm + 2 * lr * steps, (k, float(diff), float(norm))
