"""RepQ-ViT / RepQuant-style weight-and-activation post-training quantization (Li et al., ICCV 2023, and
RepQuant, 2024; facts from the papers and zkkli/RepQ-ViT).

Quantize with complex quantizers during calibration, then reparameterize them into simple ones for
inference, leaving the network's function unchanged:

- Post-LayerNorm activations (the input of ``qkv``, ``fc1`` and Swin's patch-merging ``reduction``) vary
  strongly across channels. They are calibrated per channel, an asymmetric grid ``(s_c, z_c)`` whose
  lower and upper clipping bounds are searched for every channel on the calibration set (RepQuant's
  per-channel dual clipping; here a grid search on the quantization error, alternating the two bounds),
  then reparameterized to one per-tensor grid ``s = mean(s_c)``, ``z = round(mean(z_c))``: with
  ``r1 = s_c / s`` and ``r2 = z_c - z``, the LayerNorm becomes ``gamma / r1``, ``(beta + s_c r2) / r1``
  and every linear it feeds ``W diag(r1)``, ``b - W (s_c r2)``. The per-tensor codes of the new
  activations equal the per-channel codes of the old ones and the linear's output is unchanged (exact
  before rounding). A linear without a bias (Swin's ``reduction``) cannot absorb ``r2``: there the
  channels share one zero point and only the scales are folded.
- Post-softmax attention probabilities: the log-sqrt(2) quantizer ``s * sqrt(2)^-q`` during calibration
  (its scale searched), stored as the log2 quantizer with the same codes (``q = 2e - parity``: an
  exponent and one of two scales, ``fqbench.quantized.activations.Log2Quantizer``).
- Every other quantized activation (the inputs of ``proj`` and ``fc2``; q, k and v at the output of
  ``qkv``) has one asymmetric per-tensor grid (per q/k/v chunk), its bounds searched the same way.
- Weights: the folded weights ``W diag(r1)`` are quantized by any layer-level method of the registry
  (``weight_method``, default ``rtn``: per-channel min-max round-to-nearest; ``framequant``, ``gptq``,
  ... with ``weight_options``), with the Hessian of the layer's quantized inputs as the engine
  accumulates it.

Tier: a ``BlockMethod``. The reparameterization lives inside one block (a LayerNorm and the linears it
feeds, an attention's q, k, v and probabilities), and every quantizer must be calibrated on what reaches
it with everything upstream quantized: the engine's captured block inputs (earlier blocks already
quantized) replayed through this block as its quantizers are put in place, in the order of its linears.
A layer method sees neither the norms nor the attention; a model method would redo the engine's
capture and replay. Which LayerNorm feeds which linears is not read off names: every candidate fold is
applied with random factors on one calibration batch and kept only if the block's output is unchanged
(so a norm whose output also feeds the residual, or Swin windows that zero-pad the normalized tokens,
are not folded and their linears get a per-tensor grid; the record says which).

Stored model: ``QuantLinear`` modules with their weights and ``affine`` input (and, for ``qkv``, output)
quantizers; a ``log2`` quantizer in place of each attention's ``attn_drop`` with ``fused_attn = False``;
the folded LayerNorm parameters and biases as regular tensors. It saves and reloads bit-identical.

Scope and differences from the reference code (docs/vision.md lists them): timm ViT/DeiT/Swin blocks
(timm attention with a fused ``qkv`` and ``attn_drop``). Hugging Face language models are refused:
Llama's RMSNorm has no bias to absorb the zero-point shift, their attention computes the softmax as a
function (no module to hold the stored probability quantizer), and OPT-350m is post-LayerNorm. Patch
embedding and head stay in full precision as for every method of the suite (the reference quantizes
them). ``z = round(mean(z_c))`` keeps the codes exactly equal (the reference uses the unrounded mean).
The log2 quantizer reserves its largest code for zero, so k bits hold all its levels (the reference
has 2^k levels plus zero).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fqbench.engine.capture import BlockInputs, accumulate_hessians
from fqbench.engine.sequential import layer_record
from fqbench.methods.registry import BlockMethod, build_method, register_method
from fqbench.models.adapter import replace_module
from fqbench.quant.grids import check_bits
from fqbench.quantized import QuantLinear
from fqbench.quantized.activations import (
    AffineQuantizer, Log2Quantizer, affine_quantize, check_act_bits, log_sqrt2_quantize,
)
from fqbench.records import LayerRecord
from fqbench.seeding import derive_seed

MIN_SCALE = 1e-8  # a constant channel still gets a positive step
FOLD_TOLERANCE = 1e-4  # relative change of a block's output under a random fold that still counts as exact


@dataclass
class RepQConfig:
    bits: int = 4  # weight bits (the weight method's)
    act_bits: int = 4
    weight_method: str = "rtn"  # any layer-level method of the registry, applied to the folded weights
    weight_options: dict[str, Any] = field(default_factory=dict)  # its options (its bits are ``bits``)
    clip_candidates: int = 25  # clipping bounds tried per search: ratios of the range from 1 down to clip_floor
    clip_floor: float = 0.1
    clip_rounds: int = 2  # alternations of the upper- and lower-bound searches
    search_values: int = 2 ** 20  # activation values drawn (seeded) to score the candidates of one search
    seed: int = 0

    def __post_init__(self):
        check_bits(self.bits)
        check_act_bits(self.act_bits)
        if self.clip_candidates < 1 or self.clip_rounds < 1 or self.search_values < 1:
            raise ValueError(f"clip_candidates={self.clip_candidates}, clip_rounds={self.clip_rounds}, "
                             f"search_values={self.search_values}: each must be at least 1")
        if not 0 < self.clip_floor <= 1:
            raise ValueError(f"clip_floor={self.clip_floor}: the smallest clipping ratio must be in (0, 1]")

    def ratios(self) -> list[float]:
        if self.clip_candidates == 1:
            return [1.0]
        step = (1 - self.clip_floor) / (self.clip_candidates - 1)
        return [1 - i * step for i in range(self.clip_candidates)]


def build_weight_method(config: RepQConfig):
    """The layer-level method that quantizes the folded weights, at ``config.bits``."""
    options = dict(config.weight_options)
    if "bits" in options:
        raise ValueError("method.weight_options.bits: the weight method's bits are method.bits (or bits=)")
    method = build_method(config.weight_method, bits=config.bits, **options)
    if method.tier != "layer":
        raise ValueError(f"weight_method={config.weight_method!r} is a {method.tier}-level method; repq quantizes "
                         f"its folded weights layer by layer: use a layer-level method (rtn, gptq, quip, framequant)")
    if getattr(method.config, "act_bits", None) is not None:
        raise ValueError(f"method.weight_options.act_bits={method.config.act_bits}: repq quantizes the activations "
                         f"itself (method.act_bits); leave the weight method's act_bits unset")
    return method


# --- grids and their search -------------------------------------------------------------------------

def uniform_grid(low: torch.Tensor, high: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the asymmetric k-bit grid spanning ``[low, high]`` (elementwise)."""
    scale = ((high - low) / (2 ** bits - 1)).clamp(min=MIN_SCALE)
    return scale, torch.round(-low / scale)


def search_bounds(X: torch.Tensor, candidates: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``X`` (rows, columns), the ``(low, high)`` candidate whose grid quantizes it with the
    least squared error; an earlier candidate wins ties."""
    best = None
    for low, high in candidates:
        error = (affine_quantize(X, *uniform_grid(low, high, bits), bits) - X).square().sum(dim=0)
        if best is None:
            best = [low.clone(), high.clone(), error]
            continue
        better = error < best[2]
        best = [torch.where(better, low, best[0]), torch.where(better, high, best[1]),
                torch.where(better, error, best[2])]
    return best[0], best[1]


def dual_clip(X: torch.Tensor, low: torch.Tensor, high: torch.Tensor, bits: int, ratios: Sequence[float],
              rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column clipping bounds within ``[low, high]`` (the columns' full ranges), searched alternately:
    the upper bound over ``lower + ratio (high - lower)``, then the lower one over ``upper - ratio (upper - low)``.
    Each search keeps its current bound among the candidates, so no round makes a column worse."""
    lower, upper = low, high
    for _ in range(rounds):
        _, upper = search_bounds(X, [(lower, upper), *((lower, lower + r * (high - lower)) for r in ratios)], bits)
        lower, _ = search_bounds(X, [(lower, upper), *((upper - r * (upper - low), upper) for r in ratios)], bits)
    return lower, upper


def shared_zero_bounds(X: torch.Tensor, low: torch.Tensor, high: torch.Tensor, zero: torch.Tensor, bits: int,
                       ratios: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column bounds ``[-zero s_c, (2^k - 1 - zero) s_c]`` around one integer ``zero``, ``s_c`` searched
    from the step that covers the column's range."""
    levels = 2 ** bits - 1
    cover = torch.zeros_like(high)
    if zero < levels:
        cover = torch.maximum(cover, high / (levels - zero))
    if zero > 0:
        cover = torch.maximum(cover, -low / zero)
    cover = cover.clamp(min=MIN_SCALE)
    return search_bounds(X, [(-zero * cover * r, (levels - zero) * cover * r) for r in ratios], bits)


def search_log_scale(x: torch.Tensor, peak: torch.Tensor, bits: int, ratios: Sequence[float]) -> torch.Tensor:
    """The log-sqrt(2) quantizer's scale among ``ratio * peak`` with the least squared error on ``x``."""
    best, best_error = None, None
    for r in ratios:
        scale = (peak * r).clamp(min=MIN_SCALE)
        error = (log_sqrt2_quantize(x, scale, bits) - x).square().sum()
        if best_error is None or error < best_error:
            best, best_error = scale, error
    return best.reshape(1)


# --- the reparameterization -------------------------------------------------------------------------

def fold_channel_grid(norm: nn.LayerNorm, linears: Sequence[nn.Module], scale: torch.Tensor,
                      zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-channel grid ``(scale, zero)`` of the norm's output into the norm and the linears it feeds;
    return the per-tensor ``(scale, zero)`` that now gives the same codes on the new output.

    ``gamma' = gamma / r1``, ``beta' = (beta + s_c r2) / r1``, ``W' = W diag(r1)``, ``b' = b - W s_c r2``
    with ``r1 = s_c / s``, ``r2 = z_c - z``: computed in float64, stored in the parameters' dtype.
    """
    scale, zero = scale.double(), zero.double()
    target_scale, target_zero = scale.mean(), torch.round(zero.mean())
    r1 = scale / target_scale
    shift = scale * (zero - target_zero)
    with torch.no_grad():
        _set(norm.weight, norm.weight.double() / r1)
        _set(norm.bias, (norm.bias.double() + shift) / r1)
        for linear in linears:
            W = linear.weight.double()
            if linear.bias is not None:
                _set(linear.bias, linear.bias.double() - W @ shift)
            elif torch.any(shift != 0):
                raise ValueError("a linear without a bias cannot absorb per-channel zero points; give its channels "
                                 "one zero point")
            _set(linear.weight, W * r1)
    return target_scale.float().reshape(1), target_zero.float().reshape(1)


def _set(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.data = value.to(parameter.dtype)


def find_folds(module: nn.Module, groups: Sequence[tuple[str, ...]], args: tuple, kwargs: dict,
               seed: int) -> dict[tuple[str, ...], str]:
    """``{group: norm}`` for every LayerNorm whose output reaches exactly that group of linears: a random
    per-channel grid folded into both leaves the block's output unchanged (checked on one batch, undone)."""
    norms = {path: m for path, m in module.named_modules()
             if isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None}
    with torch.no_grad():
        reference = _output(module(*args, **kwargs))
    folds = {}
    generator = torch.Generator().manual_seed(derive_seed(seed, "fold-check"))
    for group in groups:
        linears = [module.get_submodule(n) for n in group]
        for path, norm in norms.items():
            if path in folds.values() or any(l.in_features != norm.weight.numel() for l in linears):
                continue
            saved = [t.detach().clone() for m in (norm, *linears) for t in (m.weight, m.bias) if t is not None]
            scale = torch.empty(norm.weight.numel()).uniform_(0.5, 2.0, generator=generator)
            shared = any(l.bias is None for l in linears)
            zero = torch.randint(-3, 4, (1 if shared else norm.weight.numel(),), generator=generator).float()
            fold_channel_grid(norm, linears, scale.to(norm.weight.device),
                              zero.expand(norm.weight.numel()).to(norm.weight.device))
            with torch.no_grad():
                changed = _output(module(*args, **kwargs))
            for target, value in zip([t for m in (norm, *linears) for t in (m.weight, m.bias) if t is not None], saved):
                target.data = value
            if (changed - reference).norm() <= FOLD_TOLERANCE * reference.norm():
                folds[group] = path
                break
    return folds


def _output(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


# --- running the block ------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def collect(module: nn.Module, path: str, inputs: BlockInputs, output: bool = False) -> torch.Tensor:
    """The input (or output) of submodule ``path`` for every calibration sample, as rows of its last dimension;
    the block stops right after it."""
    rows = []

    def hook(sub, args, out):
        value = out if output else args[0]
        rows.append(value.detach().reshape(-1, value.shape[-1]))
        raise _Stop

    handle = module.get_submodule(path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for args, kwargs in zip(inputs.args, inputs.kwargs):
                try:
                    module(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not rows:
        raise ValueError(f"{path} is never called as a module by its block (a model that uses its weight through "
                         f"F.linear, e.g. Swin V2); repq supports timm ViT, DeiT and Swin")
    return torch.cat(rows)


def attentions(module: nn.Module) -> dict[str, str]:
    """``{qkv linear: attention}`` for every timm attention of the block (a module with ``fused_attn``)."""
    found = {}
    for path, sub in module.named_modules():
        if not hasattr(sub, "fused_attn"):
            continue
        if not (isinstance(getattr(sub, "qkv", None), nn.Module) and isinstance(getattr(sub, "attn_drop", None), nn.Module)):
            raise ValueError(f"{path or 'the block'} ({type(sub).__name__}): repq quantizes q, k, v at the output of "
                             f"a fused qkv projection and the attention probabilities at attn_drop, as timm's "
                             f"Attention and WindowAttention have them; this attention has no qkv or attn_drop")
        found[f"{path}.qkv" if path else "qkv"] = path
    return found


@register_method("repq")
class RepQ(BlockMethod):
    Config = RepQConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.weight_method = build_weight_method(self.config)

    @property
    def nominal_bits(self) -> float | None:
        return self.weight_method.nominal_bits

    def quantize_block(self, block, inputs: BlockInputs, context) -> tuple[list[LayerRecord], dict]:
        """Calibrate, fold and quantize the block's linears in order (each group's quantizers in place before
        the next group's inputs are collected); ``context.true_sequential`` does not apply: RepQ is sequential."""
        module = block.module
        if type(module).__module__.startswith("transformers."):
            raise ValueError(f"{block.name} ({type(module).__name__}): repq supports timm vision transformers; in "
                             f"Hugging Face language models the norm/softmax reparameterization does not apply "
                             f"(RMSNorm has no bias for the zero-point shift, softmax is no module; docs/vision.md)")
        qkv_of = attentions(module)
        for path in qkv_of.values():
            module.get_submodule(path).fused_attn = False  # the explicit path, where probabilities pass attn_drop
        folds = find_folds(module, block.groups, inputs.args[0], inputs.kwargs[0], context.seed)
        records, layers = [], {}
        for group in block.groups:
            start = time.perf_counter()
            quantizer, extra = self._input_quantizer(module, group, folds.get(group), inputs,
                                                     derive_seed(context.seed, block.name, *group))
            extra["calibration_seconds"] = time.perf_counter() - start
            handles = [module.get_submodule(n).register_forward_pre_hook(lambda m, args: (quantizer(args[0]), *args[1:]))
                       for n in group]
            try:
                hessians = accumulate_hessians(module, group, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            for name in group:
                full_name = f"{block.name}.{name}"
                linear = module.get_submodule(name)
                W = linear.weight.detach()
                layer = self.weight_method.quantize(W.float(), hessians[name], seed=derive_seed(context.seed, full_name))
                replace_module(module, name, QuantLinear(layer, linear.bias, input_quantizer=AffineQuantizer(
                    self.config.act_bits, scale=quantizer.scale, zero=quantizer.zero).to(W.device)))
                record = layer_record(full_name, W, layer, hessians[name])
                record.extra.update(extra, weight_method=self.weight_method.name)
                if name in qkv_of:
                    record.extra.update(self._calibrate_attention(module, qkv_of[name], name, inputs,
                                                                  derive_seed(context.seed, full_name)))
                records.append(record)
                layers[full_name] = layer
        return records, layers

    def _input_quantizer(self, module, group, norm: str | None, inputs, seed) -> tuple[AffineQuantizer, dict]:
        """The per-tensor quantizer of the group's input; after a post-LayerNorm input's per-channel grid is
        folded into the norm and the group's linears."""
        c = self.config
        X = collect(module, group[0], inputs)
        extra = {"act_bits": c.act_bits, "input_quantizer": "affine", "reparameterized_norm": norm}
        if norm is None:
            scale, zero = self._per_tensor(X, seed)
        else:
            linears = [module.get_submodule(n) for n in group]
            low, high = X.amin(dim=0), X.amax(dim=0)
            sample = _sample_rows(X, max(1, c.search_values // X.shape[1]), seed)
            lower, upper = dual_clip(sample, low, high, c.act_bits, c.ratios(), c.clip_rounds)
            channel_scale, channel_zero = uniform_grid(lower, upper, c.act_bits)
            if any(l.bias is None for l in linears):
                shared = torch.round(channel_zero.mean())
                lower, upper = shared_zero_bounds(sample, low, high, shared, c.act_bits, c.ratios())
                channel_scale, channel_zero = uniform_grid(lower, upper, c.act_bits)
            scale, zero = fold_channel_grid(module.get_submodule(norm), linears, channel_scale, channel_zero)
            ratio = channel_scale / scale
            extra.update(channel_scale_spread=float(ratio.max() / ratio.min()),
                         shared_zero=any(l.bias is None for l in linears))
        extra.update(input_scale=float(scale), input_zero=float(zero))
        return AffineQuantizer(c.act_bits, scale=scale, zero=zero).to(X.device), extra

    def _per_tensor(self, X: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        values = _sample_rows(X.reshape(-1, 1), c.search_values, seed)
        lower, upper = dual_clip(values, X.min().reshape(1), X.max().reshape(1), c.act_bits, c.ratios(), c.clip_rounds)
        return uniform_grid(lower, upper, c.act_bits)

    def _calibrate_attention(self, module, attention: str, qkv: str, inputs, seed) -> dict:
        """q, k and v (thirds of the qkv output, one grid each), then the probabilities (log-sqrt(2) scale,
        stored as a log2 quantizer in place of attn_drop); each calibrated with everything before it quantized."""
        c = self.config
        out = collect(module, qkv, inputs, output=True)
        grids = [self._per_tensor(chunk, derive_seed(seed, part)) for part, chunk in zip("qkv", out.chunk(3, dim=-1))]
        scale, zero = torch.cat([g[0] for g in grids]), torch.cat([g[1] for g in grids])
        module.get_submodule(qkv).output_quantizer = AffineQuantizer(c.act_bits, scale=scale, zero=zero).to(out.device)
        del out
        probs_path = f"{attention}.attn_drop" if attention else "attn_drop"
        probs = collect(module, probs_path, inputs, output=True)
        values = _sample_rows(probs.reshape(-1, 1), c.search_values, derive_seed(seed, "probs")).reshape(-1)
        probs_scale = search_log_scale(values, probs.max(), c.act_bits, c.ratios())
        replace_module(module, probs_path, Log2Quantizer(c.act_bits, scale=probs_scale).to(probs.device))
        return {"output_quantizer": "affine", "qkv_scales": scale.tolist(), "qkv_zeros": zero.tolist(),
                "probs_quantizer": "log2", "probs_scale": float(probs_scale)}


def _sample_rows(X: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most ``limit`` rows of ``X``, drawn with a seeded CPU generator (device-independent)."""
    if X.shape[0] <= limit:
        return X
    index = torch.randint(X.shape[0], (limit,), generator=torch.Generator().manual_seed(seed))
    return X[index.to(X.device)]
