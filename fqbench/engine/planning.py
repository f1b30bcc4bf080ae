"""The bit-budget pre-pass: every layer's options measured on the full-precision model, then one plan.

A layer method with a ``bit_budget`` (its ``budget_bits`` option) must see the whole model before
it quantizes any layer. Before the sequential solve, ``plan_budget``

1. walks the blocks in order on the full-precision model: per group of linears it accumulates
   the group's Hessians on the block's full-precision inputs, quantizes every linear with every
   option of the budget (``method.for_layer(option)``), keeps each option's stored bits and
   output error ``tr(dW H dW^T)``, and drops the Hessians (one group's live at a time, as in the solve);
   the block's full-precision outputs are the next block's inputs;
2. allocates one option per layer for the budget (``fqbench.quant.allocation.allocate``): the
   summed output error is minimised. (Summing relative errors instead, which weighs every layer
   alike whatever its output's scale, was measured too: docs/benchmarks/lm.md.)

The sequential solve then quantizes every layer with its planned option (``Plan.method_for``),
on the Hessians of the partly quantized model as usual, and records the choice with the layer.
The measured errors are estimates: the solve sees the quantized earlier layers' outputs; the
bits are exact (stored bits do not depend on the values).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from tqdm.auto import tqdm

from fqbench.engine.capture import BlockInputs, accumulate_hessians, enter_block, run_block
from fqbench.models.adapter import Block
from fqbench.quant.allocation import Option, allocate
from fqbench.quant.checks import output_error
from fqbench.seeding import derive_seed


@dataclass
class Plan:
    """The option every layer was allocated (by full name), and the layer methods that apply them."""

    method: object  # the budgeted layer method
    choices: dict[str, Option]
    weights: dict[str, int]  # weights per layer
    _methods: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def bits_per_weight(self) -> float:
        """The honest bits per weight the plan spends over all planned layers."""
        return sum(option.bits for option in self.choices.values()) / sum(self.weights.values())

    def method_for(self, name: str):
        """The layer method for ``name``, configured with its planned option."""
        if name not in self.choices:
            raise KeyError(f"{name} has no planned option; the plan covers {len(self.choices)} layers "
                           f"measured on the full-precision model")
        key = json.dumps(self.choices[name].options, sort_keys=True)
        if key not in self._methods:
            self._methods[key] = self.method.for_layer(self.choices[name].options)
        return self._methods[key]

    def describe(self, name: str) -> dict:
        """What a layer record carries about the layer's planned option."""
        option = self.choices[name]
        return {**{f"plan.{k}": v for k, v in option.options.items()}, "plan.output_error": option.error}


def plan_budget(blocks: Sequence[Block], inputs: BlockInputs, method, *, device, seed: int = 0,
                true_sequential: bool = True, progress: bool = True,
                block_kwargs=lambda index, kwargs: kwargs) -> Plan:
    """Measure every option of ``method.bit_budget`` on every linear of the full-precision blocks, and allocate."""
    budget = method.bit_budget
    candidates = [(option, method.for_layer(option)) for option in budget.choices]
    menus: dict[str, list[Option]] = {}
    weights: dict[str, int] = {}
    bar = tqdm(blocks, desc=f"measuring options ({method.name})", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        block, block_inputs, home = enter_block(block, index, inputs, device, block_kwargs)
        groups = block.groups if true_sequential else (tuple(block.linears()),)
        for group in groups:
            hessians = accumulate_hessians(block.module, group, block_inputs)
            for name in group:
                full_name = f"{block.name}.{name}"
                W = block.module.get_submodule(name).weight.data.float()
                H = hessians.pop(name)
                menus[full_name] = []
                for option, candidate in candidates:
                    layer = candidate.quantize(W, H, seed=derive_seed(seed, full_name))
                    menus[full_name].append(Option(option, layer.stored_bits, output_error(W, layer.weight(), H)))
                weights[full_name] = W.numel()
        inputs = inputs.replace_hidden(run_block(block.module, block_inputs))
        block.module.to(home)
    return Plan(method, allocate(menus, weights, budget.bits), weights)
