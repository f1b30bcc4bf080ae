"""The config tree: where it lives, and composing it outside the app (tests, the report).

The method groups' yaml files name their dataclass schemas (``method/<name>_schema``), which the
methods register with Hydra's ConfigStore when they are imported: ``compose`` (and the app)
register the built-in methods first.
"""

from __future__ import annotations

from pathlib import Path

# An absolute path: `python -m fqbench` runs the app as a module, for which Hydra would read a
# relative config_path as a Python package.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_schemas() -> None:
    """Register every built-in method's config schema with Hydra's ConfigStore."""
    from fqbench.methods import registered_methods

    registered_methods()


def compose(overrides: list[str] | tuple[str, ...] = ()):
    """The app's config with ``overrides``, as the command line would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (or a test's compose context)
        return hydra_compose("config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))
