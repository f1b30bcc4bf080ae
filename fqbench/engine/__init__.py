"""The sequential engine: capture block inputs, quantize block by block with any method tier, replay.

    from fqbench.engine import quantize_model
    result = quantize_model(model, adapter, samples, method, device="cpu")   # result.records, result.layers
"""

from fqbench.engine.capture import (
    BlockInputs, accumulate_hessians, capture_block_inputs, discover_groups, enter_block, run_block, tap_linears,
)
from fqbench.engine.planning import Plan, plan_budget
from fqbench.engine.sequential import (
    BlockContext, Quantized, install, layer_record, quantize_blocks, quantize_model, summarize,
)

__all__ = ["BlockContext", "BlockInputs", "Plan", "Quantized", "accumulate_hessians", "capture_block_inputs",
           "discover_groups", "enter_block", "install", "layer_record", "plan_budget", "quantize_blocks",
           "quantize_model", "run_block", "summarize", "tap_linears"]
