"""Shared helpers of the vision tests: composing the app's real config."""

from hydra import compose, initialize_config_dir

from fqbench.tools.train_vit import CONF_DIR


def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def model_config(name, *overrides):
    """``conf/model/<name>.yaml`` with random weights (no checkpoint is available offline)."""
    return compose_config(f"model={name}", "model.pretrained=false", *overrides).model
