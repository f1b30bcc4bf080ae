"""Numbers in the config that no job can run with, refused before any work with the key and the fix.

Method options are checked by their config dataclasses (``fqbench.app.build_method``);
this covers the job-level sizes: a zero window length or sample count would end deep
in a pipeline in a ``ZeroDivisionError`` or an unrelated message.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# key -> (smallest value, whether null is allowed, what the number is)
LIMITS = {
    "calib.nsamples": (1, False, "calibration samples"),
    "calib.seqlen": (1, False, "tokens per calibration window"),
    "calib.batch_size": (1, False, "images per calibration forward pass"),
    "eval.seqlen": (1, False, "tokens per perplexity window"),
    "eval.batch_size": (1, False, "images per evaluation batch"),
    "eval.workers": (0, False, "data-loader worker processes"),
    "eval.max_images": (1, True, "validation images (null: all)"),
    "threads": (1, True, "torch CPU threads (null: torch's default)"),
}

_ABSENT = object()


def check_config(cfg: DictConfig) -> None:
    """Raise ``ValueError`` naming the first key whose number is invalid."""
    for key, (least, nullable, meaning) in LIMITS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and nullable):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            allowed = f"a whole number >= {least}" + (" or null" if nullable else "")
            raise ValueError(f"{key}={value!r} is invalid: it is the number of {meaning} and must be {allowed}")
    timeout = cfg.get("claim_timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"claim_timeout={timeout!r} is invalid: it is the seconds without a heartbeat after which "
                         f"a job's claim is stale, and must be a number > 0 (default 600)")
