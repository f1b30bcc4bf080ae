"""Every config, preset and launcher composes; every method config instantiates; bad overrides fail clearly."""

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fqbench.app import resolve_device
from fqbench.config import CONF_DIR, register_schemas
from fqbench.methods import build_method, registered_methods

GROUPS = ("model", "method", "data", "tracking", "variant", "experiment")
REQUIRED_PRESETS = ("table1_vit", "table2_vit_large", "table3_ablation", "table5_llm_wikitext2", "table8_redundancy",
                    "table9_calibration", "table10_clip_space", "table11_activations", "table13_llm_c4",
                    "table14_downstream", "fig11_clip_threshold", "pareto")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_compose():
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield lambda overrides=(), **kw: compose("config", overrides=list(overrides), **kw)


def test_default_config_is_the_offline_run(hydra_compose):
    cfg = hydra_compose()
    assert cfg.model.task == "lm" and cfg.model.build._target_.endswith("pystdlib_lm.build")
    assert cfg.calib.dataset == "pystdlib" and list(cfg.eval.datasets) == ["pystdlib"] and cfg.eval.fp_baseline
    assert (cfg.method.bits, cfg.method.redundancy) == (2, 1.1)
    assert build_method(cfg.method).name == "framequant"


def test_other_models_keep_the_paper_protocol(hydra_compose):
    cfg = hydra_compose(["model=opt_125m"])
    assert (cfg.calib.dataset, cfg.calib.seqlen, cfg.eval.seqlen) == ("c4", 2048, 2048)
    assert "pystdlib" not in cfg.eval.datasets and "build" not in cfg.model


def test_every_option_of_every_group_composes_and_resolves(hydra_compose):
    """One composition per option; methods and variants also instantiate their method config."""
    for group in GROUPS:
        names = options(group)
        assert names, f"conf/{group} is empty"
        for name in names:
            cfg = hydra_compose([f"{group}={name}"])
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            if group in ("method", "variant"):
                assert type(build_method(cfg.method)) in registered_methods().values()


@pytest.mark.parametrize("method", ["gptq", "gptq_clip", "quip", "quip_clip", "framequant"])
def test_solver_methods_share_the_solver_group(hydra_compose, method):
    for option in options("solver"):
        cfg = hydra_compose([f"method={method}", f"solver@method.solver={option}"])
        solver = build_method(cfg.method).config.solver
        assert OmegaConf.to_container(cfg.method.solver) == vars(solver)
    cfg = hydra_compose([f"method={method}", "method.solver.act_order=true", "method.solver.blocksize=64"])
    assert (build_method(cfg.method).config.solver.act_order, cfg.method.solver.blocksize) == (True, 64)


def test_variants_set_what_their_names_say(hydra_compose):
    assert hydra_compose(["variant=fq_w2_r1.0_noclip"]).method.clip_sigma is None
    assert hydra_compose(["variant=fq_w2_r1.1_a6"]).method.act_bits == 6
    assert hydra_compose(["variant=gptq_w3", "bits=4"]).method.bits == 4  # the command line wins over a variant


def test_all_paper_presets_exist():
    assert set(REQUIRED_PRESETS) <= set(options("experiment"))


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_preset_is_one_sweep_of_existing_options(hydra_compose, preset):
    cfg = hydra_compose([f"experiment={preset}"], return_hydra_config=True)
    assert cfg.name == preset
    params = cfg.hydra.sweeper.params
    assert "model" in params and len(params) >= 2, "a preset sweeps models and methods/options"
    parser = OverridesParser.create()
    parsed = {key: parser.parse_override(f"{key}={value}") for key, value in params.items()}
    sweeps = {key: list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
              for key, o in parsed.items()}
    for group in ("model", "variant"):
        assert set(sweeps.get(group, [])) <= set(options(group)), f"{preset}: unknown {group} options"
    for pick in (0, -1):  # the first and the last job of the product compose and instantiate their method
        job = hydra_compose([f"experiment={preset}", *(f"{k}={v[pick]}" for k, v in sweeps.items())])
        build_method(job.method)
    assert len(list(itertools.product(*sweeps.values()))) >= 2


def test_preset_values_reach_the_job(hydra_compose):
    cfg = hydra_compose(["experiment=table9_calibration", "variant=fq_w2_r1.1", "calib.nsamples=32", "model=vit_s"])
    assert (cfg.calib.nsamples, cfg.method.redundancy, cfg.model.task) == (32, 1.1, "vision")
    cfg = hydra_compose(["experiment=table14_downstream", "model=llama2_7b", "variant=fp"])
    assert cfg.eval.lm_eval.enabled and cfg.name == "table14_downstream"


@pytest.mark.parametrize("overrides, expected", [
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], {"n_jobs": 3}),
    (["hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=2", "hydra.launcher.mem_gb=160"],
     {"gpus_per_node": 2, "mem_gb": 160}),
    (["hydra/launcher=slurm"], {"gpus_per_node": 1, "mem_gb": 64, "timeout_min": 1440}),
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.mem_gb=512",
      "hydra.launcher.partition=gpu"], {"gpus_per_node": 4, "mem_gb": 512, "partition": "gpu"}),
])
def test_launchers_compose_with_settable_resources(hydra_compose, overrides, expected):
    launcher = hydra_compose(overrides, return_hydra_config=True).hydra.launcher
    assert {key: launcher[key] for key in expected} == expected
    assert "joblib" in launcher._target_ or "submitit" in launcher._target_


@pytest.mark.parametrize("overrides, message", [
    (["method=gptx"], "gptq"),  # the error lists the valid choices
    (["model=vit_x"], "vit_b"),
    (["variant=nope"], "fq_w2_r1.1"),
    (["tracking=mlflow"], "wandb"),
    (["nonexistent_key=1"], "nonexistent_key"),
    (["method.clip_sgima=1"], "clip_sgima"),
])
def test_wrong_overrides_fail_with_the_choices(hydra_compose, overrides, message):
    with pytest.raises(ConfigCompositionException) as error:
        hydra_compose(overrides)
    assert message in str(error.value) + str(error.value.__cause__)


@pytest.mark.parametrize("overrides, message", [
    # types: checked by Hydra against the method's registered schema, when composing
    (["method.bits=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    (["method.redundancy=high"], "Value 'high' of type 'str' could not be converted to Float"),
    (["method.clip_sigma=[1,2]"], "clip_sigma"),
    (["method.solver.blocksize=x"], "Value 'x' of type 'str' could not be converted to Integer"),
    (["bits=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),  # through ${bits}
    # names and values: checked when the method is built
    (["+method.bogus=1"], "unknown option(s) ['bogus'] for FrameQuantConfig; valid options: bits, redundancy"),
    (["method.bits=0"], "bits=0 is not supported"),
    (["method.redundancy=0.5"], "redundancy"),
])
def test_bad_method_values_fail_clearly(hydra_compose, overrides, message):
    with pytest.raises((ConfigCompositionException, ValueError)) as error:
        build_method(hydra_compose(overrides).method)
    assert message in str(error.value) + str(error.value.__cause__)


def test_bad_device_fails_clearly():
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        resolve_device("gpu")
