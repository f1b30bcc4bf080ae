"""Command-line tools: checkpoint importers and the training script of the evidence model."""
