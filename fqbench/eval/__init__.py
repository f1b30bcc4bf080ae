"""Evaluation: perplexity (GPTQ protocol), downstream tasks (lm-evaluation-harness), vision accuracy."""
