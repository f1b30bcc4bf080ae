"""Bit budgets: the allocator, and a whole (tiny) model quantized to a budget of honest bits."""

import itertools
import logging

import pytest
import torch

from fqbench.engine import capture_block_inputs, quantize_blocks, summarize
from fqbench.methods import build_method
from fqbench.quant.allocation import Option, allocate

from test_engine import LAYOUT, setup

pytestmark = pytest.mark.usefixtures("one_thread")


def menu(*points):
    return [Option({"choice": i}, bits, error) for i, (bits, error) in enumerate(points)]


def brute_force(menus, capacity):
    best = None
    for combo in itertools.product(*menus.values()):
        bits = sum(o.bits for o in combo)
        error = sum(o.error for o in combo)
        if bits <= capacity and (best is None or error < best[0]):
            best = (error, combo)
    return best


def test_allocation_meets_the_budget_and_matches_the_optimum_on_convex_curves():
    g = torch.Generator().manual_seed(0)
    menus, weights = {}, {}
    for layer in range(6):
        size = int(torch.randint(50, 200, (1,), generator=g))
        sensitivity = float(torch.rand(1, generator=g)) * 10
        # error halves per added bit (a convex curve), cost = bits * weights
        menus[f"l{layer}"] = menu(*[(bits * size, sensitivity * 0.5**bits) for bits in (2, 3, 4, 5)])
        weights[f"l{layer}"] = size
    total = sum(weights.values())
    for budget in (2.5, 3.0, 3.7, 4.4):
        plan = allocate(menus, weights, budget)
        spent = sum(o.bits for o in plan.values())
        assert spent <= budget * total
        error, _ = brute_force(menus, budget * total)
        assert sum(o.error for o in plan.values()) <= error * 1.05  # greedy on convex curves: close to optimal


def test_allocation_gives_the_bits_to_the_sensitive_layer():
    menus = {"robust": menu((200, 1.0), (300, 0.5)), "sensitive": menu((200, 100.0), (300, 50.0))}
    plan = allocate(menus, {"robust": 100, "sensitive": 100}, 2.5)
    assert plan["sensitive"].options == {"choice": 1} and plan["robust"].options == {"choice": 0}


def test_budget_below_the_cheapest_plan_is_refused_and_a_coarse_menu_is_reported(caplog):
    menus = {"a": menu((200, 1.0), (400, 0.1)), "b": menu((200, 1.0), (400, 0.1))}
    with pytest.raises(ValueError, match=r"budget_bits=1.5 is below the cheapest plan \(2 honest bits"):
        allocate(menus, {"a": 100, "b": 100}, 1.5)
    with caplog.at_level(logging.WARNING):
        plan = allocate(menus, {"a": 100, "b": 100}, 2.9)  # one upgrade costs 1 bit per weight: 2.9 is out of reach
    assert sum(o.bits for o in plan.values()) == 400 and "too coarse" in caplog.text


def quantize_toy(method):
    model, data = setup()
    blocks = LAYOUT.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, data, lambda m, s: m(s), "cpu")
    return quantize_blocks(blocks, inputs, method, device="cpu", progress=False, keep_layers=True)


@pytest.mark.parametrize("name, options", [
    ("gptq", {"budget_bits": 3.0}),
    ("framequant", {"budget_bits": 3.0, "clip_sigma": "auto"}),
    ("framequant", {"budget_bits": 3.2, "budget_bit_widths": [2, 3], "budget_redundancies": [1.0, 1.25]}),
])
def test_a_tiny_model_meets_its_budget_and_records_every_choice(name, options):
    method = build_method(name, bits=2, **options)
    result = quantize_toy(method)
    summary = summarize(result.records)
    budget = options["budget_bits"]
    assert budget * 0.99 <= summary["bits_per_weight"] <= budget  # honest bits, from the stored tensors
    choices = set()
    for record in result.records:
        planned = {k.removeprefix("plan."): v for k, v in record.extra.items()
                   if k.startswith("plan.") and k != "plan.output_error"}
        assert set(planned) == set(method.bit_budget.choices[0])
        assert record.extra["plan.output_error"] > 0
        layer = result.layers[record.name]
        assert layer.nominal_bits == pytest.approx(planned["bits"] * planned.get("redundancy", 1.0))
        if name == "framequant":
            assert layer.in_op.spec.redundancy == planned["redundancy"]
            if options.get("clip_sigma") == "auto":
                assert "clip_sigma" in record.extra
        choices.add(tuple(sorted(planned.items())))
    assert len(choices) > 1  # the budget is spent unevenly


def test_mixed_precision_spends_its_bits_better_than_uniform_bits():
    uniform = quantize_toy(build_method("gptq", bits=3))
    bits = summarize(uniform.records)["bits_per_weight"]
    mixed = quantize_toy(build_method("gptq", budget_bits=bits))
    assert summarize(mixed.records)["bits_per_weight"] <= bits
    # the planned output errors (full-precision Hessians) sum lower than uniform 3-bit's
    uniform_plan = quantize_toy(build_method("gptq", budget_bits=bits, budget_bit_widths=[3]))
    planned = lambda result: sum(r.extra["plan.output_error"] for r in result.records)  # noqa: E731
    assert planned(mixed) < planned(uniform_plan)


def test_method_specs_take_lists_and_booleans():
    from fqbench.bench.lm_samples import parse_method

    assert parse_method("gptq:budget_bits=2.5,budget_bit_widths=2/3/4") == (
        "gptq", {"budget_bits": 2.5, "budget_bit_widths": [2, 3, 4]})
    assert parse_method("framequant:clip_sigma=auto,normalize_rows=true,act_bits=null") == (
        "framequant", {"clip_sigma": "auto", "normalize_rows": True, "act_bits": None})


def test_lm_samples_records_the_plan_of_a_budget(tmp_path):
    from fqbench.bench.lm_samples import main
    from fqbench.records import read_record
    from lm_tiny import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "llama")
    out = tmp_path / "samples.json"
    main(["--model", str(model), "--calib", "4", "--eval", "2", "--seqlen", "16", "--threads", "1", "--json", str(out),
          "--methods", "gptq:bits=2", "gptq:budget_bits=3.0,budget_bit_widths=2/3/4"])
    results = read_record(out)["results"]
    assert [r["method"] for r in results] == ["fp", "gptq:bits=2", "gptq:budget_bits=3.0,budget_bit_widths=2/3/4"]
    mixed = results[2]
    assert 2.97 <= mixed["bits_per_weight"] <= 3.0
    assert len({layer["extra"]["plan.bits"] for layer in mixed["layers"]}) > 1
