"""Shared helpers of the vision tests: composing the app's real config."""

from fqbench.config import compose


def compose_config(*overrides):
    return compose(list(overrides))


def small_swin_job(data_root, tmp_path, *overrides):
    """A Swin-T (random init, 64 px, stage depths 2,1,1,1) through the pipeline on the real images: the config."""
    return compose_config("model=swin_t", "model.pretrained=false", "+model.kwargs.depths=[2,1,1,1]",
                          "+model.kwargs.img_size=64", "+model.pretrained_cfg.input_size=[3,64,64]", *overrides,
                          "calib.nsamples=4", "eval.max_images=8", f"data.root={data_root}",
                          f"runs_root={tmp_path / 'runs'}", "device=cpu", "engine.progress=false", "eval.workers=0")


SWIN_UNITS = [f"layers.0.blocks.{j}.{n}" for j in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")] + [
    name for stage in (1, 2, 3) for name in (f"layers.{stage}.downsample.reduction",
                                             *(f"layers.{stage}.blocks.0.{n}"
                                               for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")))]


def model_config(name, *overrides):
    """``conf/model/<name>.yaml`` with random weights (no checkpoint is available offline)."""
    return compose_config(f"model={name}", "model.pretrained=false", *overrides).model
