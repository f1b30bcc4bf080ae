"""Hadamard matrices of order K * 2^m and fast transforms with them.

``H_n = H_K ⊗ H_{2^m}`` with ``H_{2^m}`` Sylvester's matrix and ``H_K`` one of
the orders in :data:`SUPPORTED_ORDERS`: K = 1, or K = 4t (t odd, K <= 256)
built by one of

- Paley I: q ≡ 3 (mod 4) a prime power gives order q + 1;
- Paley II: q ≡ 1 (mod 4) a prime power gives order 2 (q + 1);
- the Goethals–Seidel array fed with four circulant ±1 matrices of order
  t = K/4, found by an exhaustive search (orders 92, 116, 156, 172).

Every construction is deterministic, so a rotation built on ``H_n`` is the
same in every process. Orders 188 and 236 (t = 47, 59) are the K <= 256 this
module cannot build; K is capped at 256 because the dense ``H_K`` factor
costs O(d K) per vector, which beyond that is no better than a Kronecker
product of two random orthogonal matrices.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

MAX_ORDER = 256

# Largest Sylvester block applied as one dense matmul in fwht. Few wide stages
# mean few passes over memory: about 5x faster on CPU than log2(d)
# elementwise butterfly passes at d = 4096..16384.
_MAX_STAGE_BITS = 7

# t -> generator of the multiplier subgroup H of (Z/t)^* whose orbits the
# circulant search works on (see _circulant_quadruple). Found by trying the
# cyclic subgroups largest first; for t = 23 and 29 only H = {1, -1}
# (symmetric sequences, i.e. Williamson matrices) has solutions among them.
_CIRCULANT_MULTIPLIERS = {23: 22, 29: 28, 39: 29, 43: 4}


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    p = next(f for f in range(2, q + 1) if q % f == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _paley_kind(order: int) -> tuple[str, int] | None:
    q = order - 1
    if _prime_power(q) and q % 4 == 3:
        return "paley1", q
    if order % 2 == 0:
        q = order // 2 - 1
        if _prime_power(q) and q % 4 == 1:
            return "paley2", q
    return None


def _constructible(order: int) -> bool:
    return _paley_kind(order) is not None or order // 4 in _CIRCULANT_MULTIPLIERS


SUPPORTED_ORDERS: tuple[int, ...] = (1,) + tuple(
    k for k in range(12, MAX_ORDER + 1, 8) if _constructible(k)
)


def hadamard_factor(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K * 2^m and K in SUPPORTED_ORDERS, or None."""
    if n < 1:
        return None
    power = n & -n
    odd = n // power
    if odd == 1:
        return 1, n
    order = 4 * odd
    if power < 4 or order not in SUPPORTED_ORDERS:
        return None
    return order, power // 4


def hadamard_matrix(n: int) -> torch.Tensor:
    """Dense ±1 Hadamard matrix H_K ⊗ H_{2^m} of order n, float64 on the CPU."""
    order, power = _checked_factor(n)
    return torch.kron(_small_hadamard(order), _sylvester(power))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) of the last dim."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {d}")
    return kron_apply(x, _sylvester_stages(d, x.dtype, x.device))


def apply_hadamard(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ H.T (or x @ H with transpose=True), H = hadamard_matrix(x.shape[-1]).

    Costs O(d (K + log d)) per row: the K x K factor is a dense matmul, the
    power of two a fast Walsh–Hadamard transform.
    """
    order, power = _checked_factor(x.shape[-1])
    small = _small_hadamard_on(order, x.dtype, x.device)
    # Sylvester blocks are symmetric; only the K factor needs transposing.
    factors = [small.T if transpose else small] if order > 1 else []
    return kron_apply(x, factors + _sylvester_stages(power, x.dtype, x.device))


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """(F_1 ⊗ ... ⊗ F_k) v for every row vector v (last dim of x).

    One matmul per factor on a reshaped view, no transposes: O(d sum(b_i)).
    The factors must already have x's dtype and device.
    """
    shape = x.shape
    d = shape[-1]
    rows = x.reshape(-1, d)
    before = 1
    for f in factors:
        b = f.shape[0]
        after = d // (before * b)
        if after == 1:
            rows = rows.reshape(-1, b) @ f.T
        else:
            rows = f @ rows.reshape(-1, b, after)
        before *= b
    return rows.reshape(shape)


def _checked_factor(n: int) -> tuple[int, int]:
    factor = hadamard_factor(n)
    if factor is None:
        raise ValueError(
            f"no Hadamard matrix of order {n} is available: supported orders are "
            f"K * 2^m with K in {list(SUPPORTED_ORDERS)}"
        )
    return factor


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _sylvester_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _sylvester(n).to(device=device, dtype=dtype)


def _sylvester_stages(n: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Sylvester blocks whose Kronecker product is H_n (H_a ⊗ H_b = H_ab), balanced."""
    bits = n.bit_length() - 1
    count = -(-bits // _MAX_STAGE_BITS)
    sizes = [bits // count + (i < bits % count) for i in range(count)]
    return [_sylvester_on(2**s, dtype, device) for s in sizes]


@functools.lru_cache(maxsize=None)
def _small_hadamard(order: int) -> torch.Tensor:
    if order == 1:
        h = np.ones((1, 1), dtype=np.int64)
    elif (kind := _paley_kind(order)) is not None:
        h = _paley1(kind[1]) if kind[0] == "paley1" else _paley2(kind[1])
    else:
        t = order // 4
        h = _goethals_seidel(*_circulant_quadruple(t, _CIRCULANT_MULTIPLIERS[t]))
    return torch.from_numpy(h).to(torch.float64)


@functools.lru_cache(maxsize=None)
def _small_hadamard_on(order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _small_hadamard(order).to(device=device, dtype=dtype)


# --- Paley constructions over GF(q) -------------------------------------------


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b), chi the quadratic character of GF(q)."""
    p, k = _prime_power(q)
    # Field elements are the integers 0..q-1; base-p digit i is the
    # coefficient of x^i of the polynomial representing the element.
    digits = (np.arange(q)[:, None] // p ** np.arange(k)) % p
    difference = ((digits[:, None, :] - digits[None, :, :]) % p) @ p ** np.arange(k)
    return _quadratic_character(p, k)[difference]


def _quadratic_character(p: int, k: int) -> np.ndarray:
    """chi over GF(p^k) as a table indexed by element: 0, or ±1 for (non)squares.

    Builds GF(p)[x] / (f) for the first monic f of degree k in which x has
    multiplicative order p^k - 1. Then the powers of x are all nonzero
    elements, so the quotient is a field, and the squares are the even powers.
    """
    q = p**k
    for tail in itertools.product(range(p), repeat=k):  # f = x^k + sum tail[i] x^i
        element = (1,) + (0,) * (k - 1)
        powers = []
        for _ in range(q - 1):
            powers.append(sum(c * p**i for i, c in enumerate(element)))
            top = element[-1]
            shifted = (0,) + element[:-1]
            element = tuple((c - top * t) % p for c, t in zip(shifted, tail))
        if 0 not in powers and len(set(powers)) == q - 1:
            chi = np.zeros(q, dtype=np.int64)
            chi[powers] = [(-1) ** i for i in range(q - 1)]
            return chi
    raise AssertionError(f"no primitive polynomial of degree {k} over GF({p})")


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 (mod 4): I + S, S the skew conference matrix."""
    ones = np.ones((q, 1), dtype=np.int64)
    s = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [-ones, _jacobsthal(q)]])
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1), q ≡ 1 (mod 4), from the symmetric conference matrix C."""
    ones = np.ones((q, 1), dtype=np.int64)
    c = np.block([[np.zeros((1, 1), dtype=np.int64), ones.T], [ones, _jacobsthal(q)]])
    eye = np.eye(q + 1, dtype=np.int64)
    return np.block([[c + eye, c - eye], [c - eye, -c - eye]])


# --- Goethals–Seidel from four circulants -------------------------------------


def _circulant(row: np.ndarray) -> np.ndarray:
    return np.stack([np.roll(row, i) for i in range(len(row))])


def _goethals_seidel(a, b, c, d) -> np.ndarray:
    """Goethals & Seidel (1970) array: a Hadamard matrix of order 4t from ±1
    sequences of length t whose periodic autocorrelations sum to zero at every
    nonzero shift, i.e. circulants with A A^T + B B^T + C C^T + D D^T = 4t I."""
    a, b, c, d = map(_circulant, (a, b, c, d))
    r = np.eye(len(a), dtype=np.int64)[::-1]
    return np.block([
        [a, b @ r, c @ r, d @ r],
        [-b @ r, a, d.T @ r, -c.T @ r],
        [-c @ r, -d.T @ r, a, b.T @ r],
        [-d @ r, c.T @ r, -b.T @ r, a],
    ])


def _circulant_quadruple(t: int, multiplier: int) -> list[np.ndarray]:
    """Four ±1 sequences of length t whose periodic autocorrelations sum to 0.

    Exhaustive over sequences constant on the orbits of H = <multiplier>
    acting on Z_t by multiplication: 2^#orbits candidates instead of 2^t, and
    the autocorrelation of such a sequence is constant on the H-orbits of
    shifts, so one equation per orbit has to hold. Pruned by the spectral
    bound |DFT|^2 <= 4t, split by row sums (4t = s1^2 + ... + s4^2, odd s,
    positive since negating a sequence keeps its autocorrelation), and solved
    meet-in-the-middle on pairs. The first solution in this enumeration order
    is returned, so the result is deterministic; pruning drops no solution.
    """
    bound = 4 * t + 1e-6
    sequences = _orbit_sequences(t, multiplier)
    power = np.abs(np.fft.rfft(sequences, axis=1)) ** 2
    keep = (power <= bound).all(1) & (sequences.sum(1) > 0)
    sequences, power = sequences[keep], power[keep]
    sums = sequences.sum(1)
    autocorrelation = np.stack(
        [(sequences * np.roll(sequences, -s, axis=1)).sum(1) for s in range(1, t // 2 + 1)], 1
    )
    for s1, s2, s3, s4 in _odd_four_squares(4 * t):
        ab = _pairs(power, np.flatnonzero(sums == s1), np.flatnonzero(sums == s2), bound)
        cd = _pairs(power, np.flatnonzero(sums == s3), np.flatnonzero(sums == s4), bound)
        if not (len(ab) and len(cd)):
            continue
        lhs = autocorrelation[ab[:, 0]] + autocorrelation[ab[:, 1]]
        rhs = -(autocorrelation[cd[:, 0]] + autocorrelation[cd[:, 1]])
        first_ab = {}
        for j, row in enumerate(lhs):
            first_ab.setdefault(row.tobytes(), j)
        for k, row in enumerate(rhs):
            j = first_ab.get(row.tobytes())
            if j is not None:
                return [sequences[i] for i in (*ab[j], *cd[k])]
    raise AssertionError(f"no circulant quadruple of length {t} for multiplier {multiplier}")


def _orbit_sequences(t: int, multiplier: int) -> np.ndarray:
    """All ±1 sequences of length t constant on the orbits of <multiplier> on Z_t."""
    subgroup, h = [1], multiplier % t
    while h != 1:
        subgroup.append(h)
        h = h * multiplier % t
    orbits = {min(h * x % t for h in subgroup): {h * x % t for h in subgroup} for x in range(t)}
    membership = np.zeros((len(orbits), t), dtype=np.int64)
    for j, least in enumerate(sorted(orbits)):
        membership[j, list(orbits[least])] = 1
    masks = (np.arange(2 ** len(orbits))[:, None] >> np.arange(len(orbits))) & 1
    return 1 - 2 * (masks @ membership)


def _odd_four_squares(n: int) -> list[tuple[int, int, int, int]]:
    """All s1 >= s2 >= s3 >= s4 >= 1, odd, with s1^2 + s2^2 + s3^2 + s4^2 = n."""
    odd = range(math.isqrt(n) - (math.isqrt(n) + 1) % 2, 0, -2)
    return [s for s in itertools.combinations_with_replacement(odd, 4) if sum(v * v for v in s) == n]


def _pairs(power: np.ndarray, left: np.ndarray, right: np.ndarray, bound: float) -> np.ndarray:
    """Index pairs (i, j) from left x right whose spectra may sum to at most bound."""
    pairs = [
        np.stack(np.broadcast_arrays(i, right[(power[i] + power[right] <= bound).all(1)]), 1)
        for i in left
    ]
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
