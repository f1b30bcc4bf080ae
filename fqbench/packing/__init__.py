"""Packed checkpoints: quantized models saved as bit-packed safetensors and loaded back from the files alone.

    from fqbench.packing import save_quantized, load_quantized, checkpoint_sizes
    save_quantized(model, layers, "out/packed", method=method)   # layers: the engine's result.layers (keep_layers=True)
    model = load_quantized("out/packed")                        # bit-identical to the evaluated model
    model = load_quantized("out/packed", mode="packed")         # codes stay packed (QuantLinear, packed layout)
    checkpoint_sizes("out/packed")                              # on-disk bytes, FP16 bytes, bits per weight

See docs/packing.md.
"""

from fqbench.packing.checkpoint import load_quantized, read_checkpoint_config, save_quantized
from fqbench.packing.format import FORMAT_VERSION, PackedFormatError
from fqbench.packing.sizes import checkpoint_sizes

__all__ = ["FORMAT_VERSION", "PackedFormatError", "checkpoint_sizes", "load_quantized", "read_checkpoint_config",
           "save_quantized"]
