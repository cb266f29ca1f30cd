"""Hadamard matrices: the orthogonal transforms QuaRot (Ashkboos et al. 2024) and Outlier-Safe
Pre-Training's evaluation (Park et al. 2025) rotate activations with.

A Hadamard matrix of order n has entries +-1 and orthogonal rows (``H H^T = n I``);
:func:`hadamard` returns it normalised, ``H / sqrt(n)``, an orthogonal matrix. Orders:

- ``2^m``: Sylvester's construction ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` (the
  Walsh-Hadamard transform of ``fast_hadamard_transform``, which QuaRot applies for powers of 2);
- ``K * 2^m`` with ``K`` a Paley order: ``H_K (x) H_2^m`` (Kronecker product; QuaRot's
  ``get_hadK`` / ``matmul_hadU`` use the same product with tabulated ``H_K``, e.g. K = 12 for
  Llama's or SmolLM2's MLP width). Paley's construction I gives order ``q + 1`` for a prime
  ``q = 3 mod 4`` (12, 20, 44, 60, 68, 84, 108, 140, ...), construction II order ``2 (q + 1)``
  for a prime ``q = 1 mod 4`` (12, 28, 36, 60, 76, 84, 108, ...).

:func:`random_hadamard` is QuaRot's ``random_hadamard_matrix``: ``diag(s) H / sqrt(n)`` with
random signs ``s``, the residual-stream rotation.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from lmscope.core.errors import LmscopeError


def sylvester(n: int) -> Tensor:
    """Sylvester's +-1 Hadamard matrix of order ``n`` (a power of 2), float64 [n, n]."""
    if n < 1 or n & (n - 1):
        raise LmscopeError(f"Sylvester's Hadamard construction needs a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q), q prime, with chi the quadratic character (0 at 0,
    1 on nonzero squares, -1 elsewhere): float64 [q, q]."""
    squares = {(a * a) % q for a in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley(n: int) -> Tensor | None:
    """A +-1 Hadamard matrix of order ``n`` from Paley's constructions (float64 [n, n]), or None
    when neither applies. I: ``q = n - 1`` prime, ``q = 3 mod 4``: ``H = I + S`` with the skew
    matrix ``S = [[0, 1^T], [-1, Q]]``. II: ``q = n / 2 - 1`` prime, ``q = 1 mod 4``: with the
    symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``, ``H = C (x) [[1, -1], [-1, -1]] +
    I (x) [[1, 1], [1, -1]]``. ``Q`` is the Jacobsthal matrix of GF(q)."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=32)
def _signs(n: int) -> Tensor:
    """A +-1 Hadamard matrix of order ``n``: ``H_K (x) H_2^m`` for the largest power 2^m with
    K = n / 2^m 1 or a Paley order."""
    if n < 1:
        raise LmscopeError(f"no Hadamard matrix of order {n}")
    power = (n & -n).bit_length() - 1  # the largest m with 2^m dividing n
    for m in range(power, -1, -1):
        k = n >> m
        head = torch.ones(1, 1, dtype=torch.float64) if k == 1 else paley(k)
        if head is not None:
            return torch.kron(head, sylvester(1 << m))
    raise LmscopeError(
        f"no Hadamard matrix of order {n} is known to lmscope: orders are K * 2^m with K = 1 or a Paley "
        "order (q + 1 for a prime q = 3 mod 4, 2 (q + 1) for a prime q = 1 mod 4)"
    )


def hadamard(n: int) -> Tensor:
    """The normalised Hadamard matrix ``H / sqrt(n)`` of order ``n`` (orthogonal), float64 [n, n];
    a clear error for an order with no construction here (see the module docstring)."""
    return _signs(n) / n**0.5


def random_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """QuaRot's ``random_hadamard_matrix``: ``diag(s) H / sqrt(n)`` with signs ``s`` uniform in
    {-1, +1} drawn from ``generator``: a random orthogonal matrix, float64 [n, n]."""
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return signs[:, None] * hadamard(n)
