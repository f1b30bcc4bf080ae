"""The prepared device script end to end in its CPU dry run: every section runs, records are isolated."""

import json

import pytest

from fqbench.bench import gpu_check

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_records_every_path_and_isolates_failures(tmp_path, monkeypatch):
    real_layer = gpu_check.framequant_layer

    def failing_at_r11(n, k, redundancy, *args, **kwargs):
        if redundancy == 1.1:
            raise RuntimeError("injected")
        return real_layer(n, k, redundancy, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "framequant_layer", failing_at_r11)
    records = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--dry-run",
                              "--sections", "env,checks,layers,model"])
    assert records == json.loads((tmp_path / "gpu_check.json").read_text())["records"]
    by_name = {r["name"]: r for r in records}

    torch_checks = [r for r in records if r["name"].startswith(("matrix torch", "transform fast"))]
    torch_checks.append(by_name["framequant layer r=1.0 fast transform, torch"])
    assert len(torch_checks) == 9 and all(r["status"] == "ok" and r["worst"] < 2e-3 for r in torch_checks)
    assert by_name["framequant layer r=1.1 fast transform, torch"]["error"] == "RuntimeError: injected"
    assert by_name["matrix gemlite 2-bit group=row"]["status"] == "skipped"
    assert by_name["matrix gemlite 2-bit group=row"]["error"] == "gemlite needs CUDA (device cpu)"

    layers = {(r["variant"], r["rows"]): r for r in records if r["section"] == "layers" and "rows" in r}
    for variant in ("fp16", "torch 2-bit", "torch 3-bit (4-bit containers)", "framequant r=1.0 fast"):
        assert layers[(variant, 1)]["status"] == "ok" and layers[(variant, 1)]["us"] > 0, variant
    assert layers[("framequant r=1.1 fast", 1)]["status"] == "failed"
    assert layers[("framequant r=1.1 fast", 1)]["error"] == "RuntimeError: injected"

    model = {r["name"]: r for r in records if r["section"] == "model"}
    assert model["dense float32 decode batch=1"]["vs_fp16"] == 1.0
    assert model["torch 2-bit decode batch=2"]["status"] == "ok"
    assert model["torch 2-bit decode batch=2"]["weight_vs_honest_bits"] == pytest.approx(1.0, abs=0.01)
    assert model["framequant r=1.0 fast transforms, torch 2-bit prefill 1x16"]["tokens_per_s"] > 0
    assert model["framequant r=1.1 fast transforms, torch 2-bit: replace the linears"]["status"] == "failed"

    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("# GPU kernel check (cpu)", "## Checks", "## Layers", "## Model"):
        assert heading in text
    assert "| 64x128 | 1 | framequant r=1.1 fast |  |  | failed: RuntimeError: injected |" in text
