"""Model adapters: where a model's blocks are and in which order their linears are quantized."""
