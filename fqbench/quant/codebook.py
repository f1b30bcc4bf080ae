"""Lattice codebooks of 8-dimensional vectors (QuIP#'s E8P12 and its residual stages), with exact
nearest-codeword search.

The E8 lattice is ``D8 ∪ (D8 + 1/2)``: integer vectors with an even sum, and half-integer vectors
with an even sum. QuIP#'s 2-bit codebook E8P12 ("E8 padded", 12 = the largest squared norm of a
source vector) takes 256 **source** vectors with non-negative half-integer entries:

- the 227 absolute-value patterns of the points of ``D8 + 1/2`` with squared norm at most 10;
- 29 patterns of squared norm 12 (five entries 3/2, three entries 1/2; the 29 of the 56 such
  patterns that QuIP# picks, listed below by the positions of their 1/2 entries).

A codeword is a source vector with signs, plus a shift of +1/4 or -1/4 on every entry. The signs
keep the point in ``D8 + 1/2`` (even sum): flipping the sign of a half-integer entry changes the
sum by an odd integer, so the number of negative entries must have the parity of the source's
sum, and the eighth sign follows from the other seven. 256 sources x 2^7 signs x 2 shifts =
2^16 codewords, all in ``E8 + 1/4`` (``D8 + 1/2 - 1/2 = D8``), 16 bits per 8 weights.

Code layout (ours): ``source << 8 | shift << 7 | negative-sign bits of entries 0..6``; shift bit
0 adds 1/4, 1 subtracts it.

Nearest codeword, exactly, in O(256 * 8) per vector instead of O(2^16 * 8): for a shift t and
``y = x - t``, the best signs for a source ``a`` are the signs of ``y`` (cost
``|a|^2 - 2 a . |y|``, up to ``|y|^2``); when their parity is the wrong one for ``a``, the
cheapest fix flips the entry with the smallest ``a_i |y_i|``, adding ``4 min_i a_i |y_i|``.
Every source is scored this way and the best kept; the parity penalty is only evaluated for the
few sources whose unpenalised cost could still win (a lower bound prunes the rest exactly).

Entries outside a partial group (a matrix whose columns are not a multiple of 8) are masked:
they do not count in the distance, and their signs are free, so they also absorb the parity.
"""

from __future__ import annotations

import math

import torch

DIM = 8

# Positions of the three 1/2 entries of the 29 squared-norm-12 sources (the other five are 3/2).
_NORM12_HALF_POSITIONS = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2),
    (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5),
    (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6), (1, 4, 6),
    (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6),
    (0, 1, 4), (2, 3, 7),
)

# The first 227 sources are the ball's patterns, closed under permutations of the entries.
_BALL_SOURCES = 227
# Rows searched at once: bounds the (rows, 256) temporaries.
_CHUNK = 4096


class Codebook:
    """A finite set of 8-dimensional points, indexed by codes ``0 .. size - 1``."""

    name: str = ""

    def __init__(self):
        self._points: torch.Tensor | None = None
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def size(self) -> int:
        return self.points().shape[0]

    @property
    def bits(self) -> int:
        return int(math.log2(self.size))

    def build(self) -> torch.Tensor:
        """Every codeword, (size, 8) float32, row ``c`` for code ``c``."""
        raise NotImplementedError

    def points(self) -> torch.Tensor:
        if self._points is None:
            self._points = self.build()
        return self._points

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        """A table of this codebook (``points``, ...) on ``device``, copied there once."""
        key = (name, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name)().to(device)
        return self._on_device[key]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codewords of integer ``codes`` (any shape) -> (..., 8) float32 on the codes' device."""
        return self.on("points", codes.device)[codes.long()]

    def nearest(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (long) of the codewords nearest to the rows of ``x`` (n, 8); ``mask`` (8,) bool keeps the
        entries that count in the distance (None: all)."""
        x, weights = _checked(x, mask)
        points = self.on("points", x.device)
        norms = points.square() @ weights
        codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], _CHUNK):
            codes[start:start + _CHUNK] = (norms - 2 * (x[start:start + _CHUNK] * weights) @ points.T).argmin(dim=1)
        return codes


class E8P12(Codebook):
    """QuIP#'s 2-bit codebook: 2^16 points of E8 + 1/4 (see the module docstring)."""

    name = "e8p12"

    def __init__(self):
        super().__init__()
        self._sources: torch.Tensor | None = None

    def sources(self) -> torch.Tensor:
        """The 256 source vectors (non-negative half-integers), (256, 8) float32."""
        if self._sources is None:
            # Every sign pattern of a half-integer vector has a variant with an even sum (one flip changes the
            # parity), so the patterns of D8 + 1/2 in the ball are all of {1/2, 3/2, 5/2}^8 in it (7/2 is outside).
            magnitudes = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)
            grid = torch.cartesian_prod(*[magnitudes] * DIM)
            norm12 = torch.full((len(_NORM12_HALF_POSITIONS), DIM), 1.5, dtype=torch.float64)
            for row, halves in enumerate(_NORM12_HALF_POSITIONS):
                norm12[row, list(halves)] = 0.5
            self._sources = torch.cat([grid[grid.square().sum(dim=1) <= 10], norm12]).float()
            if self._sources.shape != (256, DIM):
                raise AssertionError(f"E8P12 needs 256 sources, built {self._sources.shape[0]}")
        return self._sources

    def source_parity(self) -> torch.Tensor:
        """(256,) long: the parity of each source's sum, which the number of negative entries must have."""
        return self.sources().double().sum(dim=1).long().remainder(2)

    def ball_patterns(self) -> torch.Tensor:
        """The 7 patterns (multisets, sorted descending) of the 227 ball sources, (7, 8)."""
        return torch.unique(self.sources()[:_BALL_SOURCES].sort(dim=1, descending=True).values, dim=0)

    def ball_index(self) -> torch.Tensor:
        """(3^8,) long: the source index of a ball vector from its digits ``a_i - 1/2`` in base 3 (-1 elsewhere)."""
        index = torch.full((3**DIM,), -1, dtype=torch.long)
        index[_base3(self.sources()[:_BALL_SOURCES])] = torch.arange(_BALL_SOURCES)
        return index

    def build(self) -> torch.Tensor:
        codes = torch.arange(1 << 16)
        source, sign_bits, shift_bit = codes >> 8, codes & 127, (codes >> 7) & 1
        negative = (sign_bits.unsqueeze(-1) >> torch.arange(DIM - 1)) & 1
        last = (negative.sum(dim=-1) + self.source_parity()[source]).remainder(2)
        signs = 1 - 2 * torch.cat([negative, last.unsqueeze(-1)], dim=-1).float()
        shift = 0.25 - 0.5 * shift_bit.float()
        return self.sources()[source] * signs + shift.unsqueeze(-1)

    def nearest(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, weights = _checked(x, mask)
        codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], _CHUNK):
            codes[start:start + _CHUNK] = self._nearest(x[start:start + _CHUNK], weights, mask is not None)
        return codes

    def _nearest(self, x: torch.Tensor, weights: torch.Tensor, masked: bool) -> torch.Tensor:
        n = x.shape[0]
        # Both shifts at once: rows 0..n-1 are x - 1/4 (shift bit 0), rows n..2n-1 are x + 1/4 (bit 1).
        y = torch.cat([x - 0.25, x + 0.25])
        magnitude = y.abs() * weights
        negative = y < 0
        odd = negative.sum(dim=1) & 1
        search = self._search_every_source if masked else self._search_patterns
        source, best, wrong, flip = search(magnitude, odd, weights)
        # Signs: those of y, with the cheapest entry flipped when their parity is wrong for the source.
        negative = negative ^ (torch.nn.functional.one_hot(flip, DIM).bool() & wrong.unsqueeze(1))
        distance = best + y.square() @ weights  # the costs leave out |y|^2, which differs between the shifts
        use_plus = distance[n:] < distance[:n]  # x + 1/4 is shift bit 1 (the codeword subtracts 1/4)
        pick = torch.arange(n, device=x.device) + n * use_plus.long()
        sign_bits = (negative[pick, :DIM - 1].long() << torch.arange(DIM - 1, device=x.device)).sum(dim=1)
        return source[pick] << 8 | use_plus.long() << 7 | sign_bits

    def _search_patterns(self, magnitude: torch.Tensor, odd: torch.Tensor, weights: torch.Tensor):
        """Best source for unmasked rows: ``(source, cost, parity wrong, entry to flip)``, each (rows,).

        The 227 ball sources are every arrangement of 7 patterns, and for one pattern the best arrangement
        pairs its entries with ``|y|`` in the same order (rearrangement inequality); that arrangement also
        puts the smallest entry on the smallest ``|y|``, the cheapest flip. So 7 sorted patterns stand for
        227 sources; the 29 other sources are scored one by one.
        """
        patterns = self.on("ball_patterns", magnitude.device)
        sorted_magnitude, order = magnitude.sort(dim=1, descending=True)
        wrong = (odd.unsqueeze(1) + patterns.sum(dim=1).long()) & 1  # (rows, 7)
        cost = torch.addmm(patterns.square().sum(dim=1), sorted_magnitude, patterns.T, alpha=-2)
        cost += 4 * sorted_magnitude[:, -1:] * patterns[:, -1] * wrong
        best, pattern = cost.min(dim=1)
        arranged = torch.zeros_like(magnitude).scatter_(1, order, patterns[pattern])
        source = self.on("ball_index", magnitude.device)[_base3(arranged)]
        wrong = wrong.gather(1, pattern.unsqueeze(1)).squeeze(1).bool()
        flip = order[:, -1]

        # The 29 other sources (squared norm 12) win rarely: score them exactly only where their bound could win.
        extra = self.on("sources", magnitude.device)[_BALL_SOURCES:]
        extra_parity = self.on("source_parity", magnitude.device)[_BALL_SOURCES:]
        bound = torch.addmm(extra.square().sum(dim=1), magnitude, extra.T, alpha=-2)  # (rows, 29)
        rows = torch.nonzero(bound.amin(dim=1) < best).squeeze(1)
        if rows.numel():
            extra_wrong = (odd[rows].unsqueeze(1) + extra_parity) & 1
            smallest = (extra * magnitude[rows].unsqueeze(1)).amin(dim=-1)
            extra_best, choice = (bound[rows] + 4 * smallest * extra_wrong).min(dim=1)
            better = extra_best < best[rows]
            rows, choice = rows[better], choice[better]
            source[rows] = _BALL_SOURCES + choice
            best[rows] = extra_best[better]
            wrong[rows] = extra_wrong[better].gather(1, choice.unsqueeze(1)).squeeze(1).bool()
            flip[rows] = (extra[choice] * magnitude[rows]).argmin(dim=1)
        return source, best, wrong, flip

    def _search_every_source(self, magnitude: torch.Tensor, odd: torch.Tensor, weights: torch.Tensor):
        """Best source for rows with masked entries (whose ``magnitude`` is 0), scoring all 256 sources."""
        sources = self.on("sources", magnitude.device)
        parity = self.on("source_parity", magnitude.device)

        def penalty(rows, source):  # the parity fix of ``source`` for ``rows``: cost, whether needed, entry flipped
            smallest, position = (sources[source] * magnitude[rows]).min(dim=-1)
            wrong = (odd[rows] + parity[source]) & 1
            return 4 * smallest * wrong, wrong.bool(), position

        # |y - codeword|^2 - |y|^2 with the signs of y, before the parity fix: a lower bound of each source's cost.
        cost = torch.addmm(sources.square() @ weights, magnitude, sources.T, alpha=-2)  # (rows, 256)
        every = torch.arange(magnitude.shape[0], device=magnitude.device)
        lowest, source = cost.min(dim=1)
        best = lowest + penalty(every, source)[0]
        # Only sources whose bound is below that exact cost can beat it: score them exactly.
        rows, candidates = torch.nonzero(cost < best.unsqueeze(1), as_tuple=True)
        totals = cost[rows, candidates] + penalty(rows, candidates)[0]
        best = best.scatter_reduce(0, rows, totals, "amin")
        won = totals == best[rows]
        source[rows[won]] = candidates[won]
        _, wrong, flip = penalty(every, source)
        return source, best, wrong, flip


def _base3(halves: torch.Tensor) -> torch.Tensor:
    """Base-3 keys of vectors with entries in {1/2, 3/2, 5/2}."""
    digits = (halves - 0.5).round().long()
    return (digits * 3 ** torch.arange(DIM, device=halves.device)).sum(dim=-1)


class E8Ball(Codebook):
    """The 256 points of E8 nearest the origin that QuIP#'s 3-bit residual stage uses: the origin, the
    240 roots (squared norm 2: ``±e_i ± e_j`` and ``(±1/2)^8`` with an even number of minus signs) and 15
    of the 16 points ``±2 e_i`` (all but ``-2 e_8``)."""

    name = "e8_256"

    def build(self) -> torch.Tensor:
        pairs = torch.combinations(torch.arange(DIM), 2)
        signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
        integral = torch.zeros(len(pairs), len(signs), DIM)
        for p, (i, j) in enumerate(pairs.tolist()):
            integral[p, :, i], integral[p, :, j] = signs[:, 0], signs[:, 1]
        halves = 0.5 - ((torch.arange(256).unsqueeze(1) >> torch.arange(DIM)) & 1).float()
        halves = halves[(halves < 0).sum(dim=1).remainder(2) == 0]
        axes = torch.cat([2 * torch.eye(DIM), -2 * torch.eye(DIM)[:-1]])
        points = torch.cat([torch.zeros(1, DIM), integral.reshape(-1, DIM), halves, axes])
        if points.shape != (256, DIM):
            raise AssertionError(f"the E8 ball codebook needs 256 points, built {points.shape[0]}")
        return points


class VectorCodebook:
    """What a codebook weight stores codes of: one or more stages, greedy residual vector quantization.

    ``decode(codes) = sum_k stage_k[codes_k] / gain_k`` (``gain_0 = 1``); stage k > 0 quantizes the
    residual of the stages before it, multiplied by its gain. The weight's scale is
    ``RMS(W) / rms_ratio`` (QuIP#'s ``opt_scale``, chosen by its authors to minimise the codebook's
    error on Gaussian data: incoherent weights are nearly Gaussian).
    """

    def __init__(self, name: str, stages: tuple[Codebook, ...], gains: tuple[float, ...], rms_ratio: float):
        if len(stages) != len(gains) or gains[0] != 1:
            raise ValueError("one gain per stage, the first 1")
        self.name = name
        self.stages = stages
        self.gains = gains
        self.rms_ratio = rms_ratio

    @property
    def bits_per_weight(self) -> float:
        return sum(stage.bits for stage in self.stages) / DIM

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (stages, n) long of the rows of ``x`` (n, 8) at unit scale."""
        codes = []
        target = x.float()
        for stage, gain in zip(self.stages, self.gains):
            code = stage.nearest(target * gain, mask)
            codes.append(code)
            target = target - stage.decode(code) / gain
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codewords of ``codes`` (stages, ...) -> (..., 8) float32."""
        value = self.stages[0].decode(codes[0])
        for stage, gain, code in zip(self.stages[1:], self.gains[1:], codes[1:]):
            value = value + stage.decode(code) / gain
        return value

    def __repr__(self) -> str:
        return f"VectorCodebook({self.name!r}, {self.bits_per_weight:g} bits/weight)"


E8P12_CODEBOOK = E8P12()
E8_BALL_CODEBOOK = E8Ball()
# QuIP#'s codebooks (lib/codebook in the reference): E8P12 at 2 bits; residual VQ at 3 bits (E8P12,
# then the E8 ball at gain 2.04) and at 4 bits (E8P12 twice, the second at gain 3.45).
VECTOR_CODEBOOKS = {cb.name: cb for cb in (
    VectorCodebook("e8p12", (E8P12_CODEBOOK,), (1.0,), rms_ratio=1.03),
    VectorCodebook("e8p12_rvq3", (E8P12_CODEBOOK, E8_BALL_CODEBOOK), (1.0, 2.04), rms_ratio=0.98),
    VectorCodebook("e8p12_rvq4", (E8P12_CODEBOOK, E8P12_CODEBOOK), (1.0, 3.45), rms_ratio=1.03),
)}
CODEBOOK_FOR_BITS = {2: "e8p12", 3: "e8p12_rvq3", 4: "e8p12_rvq4"}


def vector_codebook(name: str) -> VectorCodebook:
    if name not in VECTOR_CODEBOOKS:
        raise ValueError(f"unknown codebook {name!r}; known: {', '.join(VECTOR_CODEBOOKS)}")
    return VECTOR_CODEBOOKS[name]


def _checked(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float32 and the per-entry weights of the distance (1 kept, 0 masked)."""
    if x.dim() != 2 or x.shape[1] != DIM:
        raise ValueError(f"codebook search needs (n, {DIM}) vectors, got shape {tuple(x.shape)}")
    if mask is None:
        return x.float(), torch.ones(DIM, device=x.device)
    if mask.shape != (DIM,):
        raise ValueError(f"the mask must have {DIM} entries, got shape {tuple(mask.shape)}")
    return x.float(), mask.to(device=x.device, dtype=torch.float32)
