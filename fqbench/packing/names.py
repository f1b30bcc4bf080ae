"""File and key names of a packed checkpoint (shared by writing, reading and measuring it)."""

QUANT_METHOD = "fqbench"  # quantization_config.quant_method
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
INFIX = "quantized"  # a quantized layer's tensors are <linear>.quantized.<name>
