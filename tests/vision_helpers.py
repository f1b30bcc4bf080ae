"""Shared helpers of the vision tests: composing the app's real config."""

from fqbench.config import compose


def compose_config(*overrides):
    return compose(list(overrides))


def model_config(name, *overrides):
    """``conf/model/<name>.yaml`` with random weights (no checkpoint is available offline)."""
    return compose_config(f"model={name}", "model.pretrained=false", *overrides).model
