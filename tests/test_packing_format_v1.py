"""Checkpoints written by format version 1 (fqbench before the one-quantized-layer redesign) still load.

tests/data/format_v1 holds tiny Llama checkpoints packed by commit a0d47fb (GPTQ with act-order and
groups, QuIP, FrameQuant with frame-space activation quantization, symmetric RTN) with the logits
the evaluated model gave on a probe.
"""

import json
from pathlib import Path

import pytest
import torch

from fqbench.packing import load_quantized

FIXTURES = Path(__file__).parent / "data" / "format_v1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["expected"]))
@pytest.mark.parametrize("mode", ["dequantized", "packed"])
def test_format_v1_checkpoints_load_and_give_the_evaluated_logits(name, mode):
    expected = torch.load(FIXTURES / name / "expected_logits.pt")
    with pytest.warns(UserWarning, match="no tensor checksums.*cannot be verified"):  # written before checksums
        model = load_quantized(FIXTURES / name, mode=mode)
    with torch.no_grad():
        logits = model(torch.tensor(EXPECTED["probe"])).logits
    if mode == "dequantized":
        assert torch.equal(logits, expected)
    else:
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
