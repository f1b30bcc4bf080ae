"""Packed low-bit storage and inference for quantized models.

    from fqbench.packing import save_quantized, load_quantized, checkpoint_sizes
    save_quantized(model, layers, "out/packed", method=method)   # layers: quantize_blocks(..., keep_layers=True)
    model = load_quantized("out/packed")                        # bit-identical to the evaluated model
    model = load_quantized("out/packed", mode="packed")         # codes stay packed; frame-space FrameQuant
    checkpoint_sizes("out/packed")                              # on-disk bytes, FP16 bytes, bits per weight

See docs/packing.md.
"""

from fqbench.packing.bits import pack_bits, unpack_bits
from fqbench.packing.checkpoint import load_quantized, read_checkpoint_config, save_quantized, save_run
from fqbench.packing.format import PackedFormatError
from fqbench.packing.modules import FrameLinear, PackedLinear, PackedMatrix, pack_module
from fqbench.packing.sizes import checkpoint_sizes

__all__ = [
    "FrameLinear",
    "PackedFormatError",
    "PackedLinear",
    "PackedMatrix",
    "checkpoint_sizes",
    "load_quantized",
    "pack_bits",
    "pack_module",
    "read_checkpoint_config",
    "save_quantized",
    "save_run",
    "unpack_bits",
]
