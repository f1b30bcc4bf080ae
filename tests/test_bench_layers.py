"""The layer benchmark: every method on the same layer, ratios against GPTQ from the same process."""

import json

import pytest

from fqbench.bench import layers
from fqbench.bench.layers import DEFAULT_METHODS, main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_benchmark_reports_every_method_as_ratios_to_gptq(tmp_path, capsys):
    out = tmp_path / "rows.json"
    main(["--shapes", "96x128", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == len(DEFAULT_METHODS)
    by_method = {r["method"]: r for r in rows}
    gptq = by_method["gptq"]
    assert gptq["error_vs_gptq"] == 1.0 and gptq["time_vs_gptq"] == 1.0
    # The reference implementation, with float32 scales as ours in reference-exact mode: the same weights.
    assert by_method["gptq_reference"]["proxy_error"] == by_method["gptq scale_dtype=float32"]["proxy_error"]
    # float16 scales (what a packed model stores) move the error a little
    assert by_method["gptq_reference"]["proxy_error"] == pytest.approx(gptq["proxy_error"], rel=0.02)
    assert by_method["rtn"]["error_vs_gptq"] > 1
    assert by_method["framequant redundancy=1.1"]["bits_per_weight"] > by_method["framequant redundancy=1.0"]["bits_per_weight"]
    assert all(r["seconds"] > 0 for r in rows)
    assert "| 96x128 | framequant redundancy=1.0 |" in capsys.readouterr().out


def test_layer_benchmark_on_every_linear_of_a_pretrained_model(tmp_path, capsys, monkeypatch):
    from lm_tiny import save_tiny_model

    methods = [("gptq", {}), ("quip_sharp", {})]
    monkeypatch.setattr(layers, "DEFAULT_METHODS", methods)
    model = save_tiny_model("llama", tmp_path / "llama")
    out = tmp_path / "rows.json"
    main(["--model", str(model), "--calib", "2", "--eval", "1", "--seqlen", "16", "--repeats", "1", "--warmup", "0",
          "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())
    linears = {r["shape"] for r in rows}
    assert len(linears) == 2 * 7 and len(rows) == len(linears) * len(methods)  # 2 blocks of 7 linears
    assert all(r["error_vs_gptq"] == 1.0 for r in rows if r["method"] == "gptq")
    summary = capsys.readouterr().out
    assert "| 14 layers | quip_sharp |" in summary and "| 14 layers | gptq | " in summary


def test_methods_option_replaces_the_default_list_and_keeps_gptq(tmp_path):
    out = tmp_path / "rows.json"
    main(["--shapes", "48x64", "--bits", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out),
          "--methods", "framequant:clip_sigma=auto", "framequant:clip_sigma=auto,grid_fit=mse"])
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["gptq", "framequant clip_sigma=auto", "framequant clip_sigma=auto grid_fit=mse"]
    assert all(r["bits_per_weight"] > 4 for r in rows)
