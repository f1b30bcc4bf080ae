"""Bit allocation: one option per layer so that the whole model meets a budget of honest bits.

Every layer has a menu of options (bit widths, redundancies, ...) measured on its calibration
Hessian: what each costs in stored bits and the output error it leaves. ``allocate``
chooses one option per layer minimising the summed error subject to

    sum over layers of stored bits <= budget * (number of quantized weights),

a multiple-choice knapsack. It starts from every layer's cheapest option and repeatedly takes
the upgrade of any layer that removes the most error per added bit among those that still fit.
On convex error-versus-bits curves this is the Lagrangian optimum (each step is the next point
of some layer's lower convex hull at the current price of a bit); the steps that no longer fit
then fill the remaining budget with smaller upgrades, so the plan lands just under the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# How far under the budget a plan may land before the menu is called too coarse.
BUDGET_TOLERANCE = 0.01


@dataclass(frozen=True)
class BitBudget:
    """A method's request: ``bits`` honest bits per weight over the whole model, one of ``choices`` per layer.

    Each choice is a dict of the method's options (e.g. ``{"bits": 2, "redundancy": 1.25}``);
    the engine measures every choice on every layer and allocates (``fqbench.engine.planning``).
    """

    bits: float
    choices: tuple[dict, ...]

    def __post_init__(self):
        if not (self.bits > 0 and self.bits < float("inf")):
            raise ValueError(f"budget_bits={self.bits!r} must be a positive number of honest bits per weight")
        if not self.choices:
            raise ValueError("a bit budget needs at least one option per layer to choose from")


@dataclass(frozen=True)
class Option:
    """One choice for one layer, as measured: its stored bits and its output error."""

    options: dict = field(hash=False)
    bits: int
    error: float


def allocate(menus: dict[str, list[Option]], weights: dict[str, int], budget: float) -> dict[str, Option]:
    """The option of every layer (``menus[name]``; ``weights[name]`` weights) for ``budget`` bits per weight.

    Raises ``ValueError`` when even the cheapest options exceed the budget; logs a warning
    when the plan lands more than 1% under it (the menu is too coarse to spend it).
    """
    names = list(menus)
    if not names:
        raise ValueError("nothing to allocate: no quantized layers")
    total = sum(weights[name] for name in names)
    capacity = budget * total
    width = max(len(menus[name]) for name in names)
    # Padding options cost infinitely much, so they are never chosen.
    bits = np.full((len(names), width), np.inf)
    error = np.full((len(names), width), np.inf)
    for i, name in enumerate(names):
        for j, option in enumerate(menus[name]):
            bits[i, j], error[i, j] = option.bits, option.error
    rows = np.arange(len(names))
    # The cheapest option of each layer, the less erroneous one among equally cheap ones.
    choice = np.lexsort((error, bits), axis=1)[:, 0] if width > 1 else np.zeros(len(names), dtype=int)
    spent = bits[rows, choice].sum()
    if spent > capacity:
        raise ValueError(f"budget_bits={budget:g} is below the cheapest plan ({spent / total:.4g} honest bits per "
                         f"weight); raise the budget or add cheaper options (fewer bits, less redundancy)")
    while True:
        extra_bits = bits - bits[rows, choice][:, None]
        gain = error[rows, choice][:, None] - error
        fits = (extra_bits > 0) & (gain > 0) & (extra_bits <= capacity - spent)
        if not fits.any():
            break
        ratio = np.where(fits, gain / np.where(fits, extra_bits, 1.0), -np.inf)
        layer, option = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += extra_bits[layer, option]
        choice[layer] = option
    achieved = spent / total
    if achieved < budget * (1 - BUDGET_TOLERANCE):
        log.warning("the allocation spends %.4g of the %.4g bits per weight allowed: the options are too coarse "
                    "(or too few) to use the budget", achieved, budget)
    return {name: menus[name][choice[i]] for i, name in enumerate(names)}
