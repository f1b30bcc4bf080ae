"""Pinned layer-level results: the same seeds give the same held-out errors and honest bits.

The values were computed before the architecture redesign (issue 9, commit a0d47fb) with the code
of that commit; a refactor must reproduce them (relative 1e-6). A deliberate change of a method's
numerics updates them in the same commit and says why.
"""

import pytest
import torch

from fqbench.methods import build_method

SEEDED = ("quip", "quip_clip", "framequant")

# (method, options, (out, in), held-out relative output error, honest bits per weight)
PINNED = [
    ('rtn', {'bits': 2}, (96, 128), 0.4422822892665863, 2.140625),
    ('rtn', {'bits': 3, 'groupsize': 32}, (96, 128), 0.06274961680173874, 3.59375),
    ('gptq', {'bits': 2}, (96, 128), 0.28004828095436096, 2.140625),
    ('gptq', {'bits': 3, 'solver': {'act_order': True, 'groupsize': 32}}, (96, 128), 0.011005410924553871, 3.6145833333333335),
    ('gptq_clip', {'bits': 2}, (96, 128), 0.16293473541736603, 2.140625),
    ('quip', {'bits': 2}, (96, 128), 0.025593185797333717, 2.19921875),
    ('quip_clip', {'bits': 2}, (96, 128), 0.02587626315653324, 2.3385416666666665),
    ('framequant', {'bits': 2, 'redundancy': 1.0}, (96, 128), 0.04286361485719681, 2.171875),
    ('framequant', {'bits': 2, 'redundancy': 1.1}, (96, 128), 0.02341959811747074, 2.720703125),
    ('framequant', {'bits': 3, 'redundancy': 1.1, 'redundancy_sides': 'input', 'zero_point': 'float'}, (96, 128), 0.013430933468043804, 3.65625),
    ('framequant', {'bits': 2, 'redundancy': 1.0, 'denoise': True}, (96, 128), 0.035652194172143936, 2.171875),
    ('rtn', {'bits': 2}, (100, 172), 0.4631330668926239, 2.104651162790698),
    ('rtn', {'bits': 3, 'groupsize': 32}, (100, 172), 0.04653041437268257, 3.6927906976744187),
    ('gptq', {'bits': 2}, (100, 172), 0.2887972295284271, 2.104651162790698),
    ('gptq', {'bits': 3, 'solver': {'act_order': True, 'groupsize': 32}}, (100, 172), 0.01282885018736124, 3.6927906976744187),
    ('gptq_clip', {'bits': 2}, (100, 172), 0.19548167288303375, 2.104651162790698),
    ('quip', {'bits': 2}, (100, 172), 0.022982608526945114, 2.1832558139534886),
    ('quip_clip', {'bits': 2}, (100, 172), 0.024675419554114342, 2.2869767441860467),
    ('framequant', {'bits': 2, 'redundancy': 1.0}, (100, 172), 0.02731521613895893, 2.1269767441860465),
    ('framequant', {'bits': 2, 'redundancy': 1.1}, (100, 172), 0.02184298262000084, 2.542093023255814),
    ('framequant', {'bits': 3, 'redundancy': 1.1, 'redundancy_sides': 'input', 'zero_point': 'float'}, (100, 172), 0.011348376981914043, 3.487441860465116),
    ('framequant', {'bits': 2, 'redundancy': 1.0, 'denoise': True}, (100, 172), 0.023839261382818222, 2.1269767441860465),
]


@pytest.fixture(scope="module")
def layers(one_thread):
    from conftest import synthetic_layer

    return {shape: synthetic_layer(*shape, samples=1024, heavy_tailed=True, outlier_channels=3, seed=7)
            for shape in {case[2] for case in PINNED}}


@pytest.mark.parametrize("name, options, shape, error, bits", PINNED,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PINNED)])
def test_pinned_results(layers, name, options, shape, error, bits):
    W, H, X = layers[shape]
    method = build_method(name, seed=3, **options) if name in SEEDED else build_method(name, **options)
    layer = method.quantize(W, H)
    reference = X @ W.T
    measured = float((X @ layer.weight().T - reference).square().sum() / reference.square().sum())
    assert measured == pytest.approx(error, rel=1e-6)
    assert layer.bits_per_weight == pytest.approx(bits, rel=1e-12)
