"""PTQ4ViT-style post-training quantization (Yuan et al., ECCV 2022; facts from hahnyuan/PTQ4ViT).

- Uniform symmetric quantizer ``clamp(round(x / delta), -2^(k-1), 2^(k-1) - 1) * delta``,
  one ``delta`` per tensor (per q/k/v block for the qkv projection's weight).
- Twin uniform quantization: post-softmax values get two unsigned (k-1)-bit
  ranges, ``[0, split]`` and ``[0, 1]``, split searched over ``2^-i``; post-GELU
  values (the input of ``fc2``) a fixed negative range ``[-0.17, 0]`` and a
  searched positive range.
- Hessian-guided scale search: candidates ``delta_init * (alpha + i (beta - alpha) / n)``,
  ``i = 0..n``, scored by ``mean((g * (y_hat - y))^2)`` over the layer's outputs,
  ``g`` the gradient of the task loss with respect to them (the diagonal Fisher
  approximation of the output Hessian); ``rounds`` rounds alternate the weight
  and the activation scales.
- Calibration as the reference's default ("parallel"): every layer sees the
  full-precision model's inputs, outputs and gradients; the quantized weights
  and activation quantizers are put in place once every layer is calibrated.

Weight-only by default, as in the FrameQuant paper's comparison; ``act_bits``
also quantizes every linear's input, q, k, v and the attention probabilities.
Where this differs from the reference code (docs/vision.md lists it):
the gradients are those of the cross-entropy against the full-precision model's
top-1 prediction (the reference differentiates ``KL(FP || model)`` on the FP
model itself, which is zero up to rounding: hahnyuan/PTQ4ViT#23); a search
keeps its current scale unless a candidate strictly improves the metric; the
post-softmax twin quantizer uses one range per value (the paper's definition;
the reference code adds both ranges' outputs); attention quantizers are scored
on the attention context (the output projection's input); patch embedding and
head stay in full precision as for every method of the suite.

This is a model-level method (``ModelMethod``): the engine calls ``quantize_model``
instead of quantizing layer by layer. The weights are stored as symmetric grids (one
step per q/k/v block), the activation quantizers as modules of the model
(``fqbench.quantized.activations``), so a W/A model saves and reloads packed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fqbench.methods.registry import ModelMethod, register_method
from fqbench.models.adapter import replace_module
from fqbench.quant.checks import proxy_error
from fqbench.quant.grids import check_bits
from fqbench.quantized import GridWeight, QuantLinear
from fqbench.quantized.activations import (
    TwinGeluQuantizer, TwinSoftmaxQuantizer, UniformQuantizer, check_act_bits, twin_gelu_quantize, uniform_quantize,
)
from fqbench.records import LayerRecord

SOFTMAX_SPLITS = 20  # post-softmax split candidates 2^0 .. 2^-19
METRICS = ("hessian", "mse")
TOKEN_CHUNK = 16384  # rows per matmul while scoring candidates (bounds temporary memory)


@dataclass
class PTQ4ViTConfig:
    bits: int = 2
    act_bits: int | None = None  # None: weight-only (the FrameQuant paper's comparison)
    alpha: float = 0.01
    beta: float = 1.2
    candidates: int = 100  # the reference's eq_n: n + 1 candidate scales per search
    rounds: int = 3  # alternations of weight and activation searches
    metric: str = "hessian"  # hessian: gradient-weighted output error; mse: plain output error

    def __post_init__(self):
        check_bits(self.bits)
        if self.bits < 2:
            raise ValueError(f"bits={self.bits}: a symmetric signed quantizer needs at least 2 bits")
        if self.act_bits is not None:
            check_act_bits(self.act_bits)
        if not 0 < self.alpha < self.beta:
            raise ValueError(f"alpha={self.alpha}, beta={self.beta}: need 0 < alpha < beta (candidate scale factors)")
        if self.candidates < 1 or self.rounds < 1:
            raise ValueError(f"candidates={self.candidates}, rounds={self.rounds}: both must be at least 1")
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r}; choose one of {METRICS}")

    def factors(self) -> list[float]:
        step = (self.beta - self.alpha) / self.candidates
        return [self.alpha + i * step for i in range(self.candidates + 1)]


# --- quantizers -----------------------------------------------------------------------------------

def search_scale(current: torch.Tensor, candidates: Iterable[torch.Tensor],
                 score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise best of ``current`` and the candidates under ``score`` (lower is better).

    ``current`` and every candidate have the same shape; ``score`` maps one to a
    tensor of that shape whose entries are independent (one per quantizer block).
    A candidate replaces the current value only where it is strictly better, so the
    result never scores worse than the starting point.
    """
    best, best_score = current.clone(), score(current)
    for candidate in candidates:
        value = score(candidate)
        better = value < best_score
        best = torch.where(better, candidate, best)
        best_score = torch.where(better, value, best_score)
    return best, best_score


def symmetric_weight(W: torch.Tensor, deltas: torch.Tensor, bits: int) -> GridWeight:
    """Symmetric codes with one float16 step per block of rows: ``W_hat = delta_b * (codes - 2^(k-1))``."""
    blocks = deltas.numel()
    scale = deltas.float().repeat_interleave(W.shape[0] // blocks)[:, None]
    q = 2 ** (bits - 1)
    codes = torch.clamp(torch.round(W.float() / scale), -q, q - 1) + q
    return GridWeight.fit(codes, scale, torch.full_like(scale, q), torch.zeros(W.shape[1], dtype=torch.long),
                          bits=bits, integer_zero=True, scale_rows=blocks, zero_value=float(q))


# --- recording a unit on the full-precision model -------------------------------------------------

@dataclass
class Trace:
    """A linear's calibration data from the FP model, flattened to rows: input, output, output gradient."""

    x: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    x_grad: torch.Tensor | None = None  # the input's gradient (recorded for the attention output projection)


@dataclass
class AttentionTrace:
    inputs: list[tuple[tuple, dict]]  # the attention module's (args, kwargs) per batch


class _Stop(Exception):
    pass


def _record(model, unit, names: Sequence[str], attention: str | None, input_grads: set, batches, labels):
    """One forward and backward pass of the FP model per batch, with hooks on the unit's linears.

    ``attention``: also record that module's inputs; ``input_grads``: linears whose input gradient is kept.
    """
    store = {n: {"x": [], "y": [], "g": [], "x_grad": []} for n in names}
    attention_inputs = []
    handles = []
    for name in names:
        module = unit.module.get_submodule(name)
        slot = store[name]

        def forward_hook(module, args, output, slot=slot):
            slot["x"].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            slot["y"].append(output.detach().reshape(-1, output.shape[-1]))

        def backward_hook(module, grad_input, grad_output, slot=slot, keep_input_grad=name in input_grads):
            slot["g"].append(grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]))
            if keep_input_grad:
                slot["x_grad"].append(grad_input[0].detach().reshape(-1, grad_input[0].shape[-1]))

        handles += [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    if attention is not None:
        def attention_hook(module, args, kwargs):
            attention_inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                                     {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

        handles.append(unit.module.get_submodule(attention).register_forward_pre_hook(attention_hook, with_kwargs=True))
    try:
        for images, target in zip(batches, labels):
            images = images.clone().requires_grad_(True)  # gradients flow through activations, not parameters
            loss = F.cross_entropy(model(images), target, reduction="sum")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    traces = {n: Trace(*(torch.cat(store[n][k]) if store[n][k] else None for k in ("x", "y", "g", "x_grad")))
              for n in names}
    return traces, (AttentionTrace(attention_inputs) if attention is not None else None)


# --- the method -----------------------------------------------------------------------------------

@register_method("ptq4vit")
class PTQ4ViT(ModelMethod):
    Config = PTQ4ViTConfig

    def quantize_model(self, model: nn.Module, layout, batches: Sequence[torch.Tensor], *, device,
                       seed: int = 0, progress: bool = True) -> list:
        """Calibrate every linear of the adapter's blocks (and, with ``act_bits``, the activations), then
        put the quantized weights and activation quantizers in place. Returns per-layer records and the
        quantized weights by full linear name.

        ``layout``: the timm adapter (``fqbench.models.timm.TimmAdapter``), which names the attention's parts.
        ``seed`` is part of the model-level interface; this method draws no random numbers.
        """
        c = self.config
        model.to(device).eval()
        batches = [b.to(device) for b in batches]
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                labels = [model(b).argmax(dim=-1) for b in batches]  # the FP model's predictions
            plans, records, layers = [], [], {}
            units = layout.blocks(model)
            implicit = [u.name for u in units if u.groups is None]
            if implicit:
                raise ValueError(f"{self.name} needs the linears of every block named by the model family "
                                 f"(model.family=vit or swin); {implicit[0]} has none")
            bar = tqdm(units, desc=f"calibrating ({self.name})", unit="block", disable=not progress)
            for unit in bar:
                attention = layout.attention if (c.act_bits is not None and _has(unit.module, layout.attention)) else None
                out_name = f"{layout.attention}.{layout.attention_out}"
                traces, attention_trace = _record(model, unit, unit.linears(), attention,
                                                  {out_name} if attention else set(), batches, labels)
                for name in unit.linears():
                    plan, record, layer = self._calibrate_linear(unit, name, layout, traces[name])
                    plans.append(plan)
                    records.append(record)
                    layers[record.name] = layer
                if attention is not None:
                    plans.append(self._calibrate_attention(unit, layout, attention_trace, traces[out_name],
                                                           traces[f"{layout.attention}.{layout.attention_qkv}"]))
                del traces, attention_trace
                bar.set_postfix(block=unit.name)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        for plan in plans:
            plan()
        return records, layers

    # Each calibration returns a closure that installs its result, run once all layers are calibrated.

    def _calibrate_linear(self, unit, name, layout, trace: Trace):
        c = self.config
        start = time.perf_counter()
        linear = unit.module.get_submodule(name)
        W = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        blocks = 3 if name == f"{layout.attention}.{layout.attention_qkv}" else 1
        if W.shape[0] % blocks:
            raise ValueError(f"{unit.name}.{name}: {W.shape[0]} output rows do not split into {blocks} q/k/v blocks")
        q = 2 ** (c.bits - 1)
        w_base = W.view(blocks, -1).abs().amax(dim=1) / (q - 0.5)
        w_scale = w_base.half().float()
        post_gelu = name in layout.post_gelu
        act = None
        if c.act_bits is not None:
            peak = trace.x.max() if post_gelu else trace.x.abs().max()
            a_base = (peak / (2 ** (c.act_bits - 1) - 0.5)).reshape(1).clamp(min=1e-8)
            act = a_base.clone()

        def quantize_input(x, a_scale):
            if a_scale is None:
                return x
            fn = twin_gelu_quantize if post_gelu else uniform_quantize
            return fn(x, a_scale, c.act_bits)

        def error(w_deltas, a_scale):
            """Per-block metric of the layer output with these steps."""
            W_hat = uniform_quantize(W.view(blocks, -1), w_deltas[:, None], c.bits).view_as(W)
            total = torch.zeros(blocks, dtype=torch.float64, device=W.device)
            for rows in _chunks(trace.x.shape[0]):
                y = F.linear(quantize_input(trace.x[rows], a_scale), W_hat, bias)
                diff = y - trace.y[rows]
                if c.metric == "hessian":
                    diff = diff * trace.g[rows]
                total += diff.square().view(diff.shape[0], blocks, -1).sum(dim=(0, 2), dtype=torch.float64)
            return total / trace.y.numel()

        rounds = c.rounds if act is not None else 1  # weight-only: nothing to alternate with
        with torch.no_grad():
            for _ in range(rounds):
                w_scale, w_error = search_scale(w_scale, [(w_base * f).half().float() for f in c.factors()],
                                                lambda s: error(s, act))
                if act is not None:
                    act, _ = search_scale(act, [a_base * f for f in c.factors()],
                                          lambda s: error(w_scale, s).sum().reshape(1))
        layer = symmetric_weight(W, w_scale, c.bits)
        layer.method, layer.nominal_bits = self.name, float(c.bits)
        W_hat = layer.weight()
        H = (2.0 / trace.x.shape[0]) * (trace.x.double().T @ trace.x.double())
        record = LayerRecord(
            name=f"{unit.name}.{name}", shape=tuple(W.shape), proxy_error=proxy_error(W, W_hat, H),
            seconds=time.perf_counter() - start, damping=None, bits_per_weight=layer.bits_per_weight,
            nominal_bits=float(c.bits),
            extra={"weight_scales": w_scale.tolist(), "metric": c.metric, "output_error": float(w_error.sum()),
                   **({"act_bits": c.act_bits, "act_scale": float(act), "act_quantizer":
                       "twin_gelu" if post_gelu else "uniform"} if act is not None else {})},
        )

        def install():
            if act is None:
                linear.weight.data = W_hat.to(linear.weight.device, linear.weight.dtype)
                return
            quantizer = (TwinGeluQuantizer(c.act_bits, positive_step=act) if post_gelu
                         else UniformQuantizer(c.act_bits, step=act))
            replace_module(unit.module, name, QuantLinear(layer.to(linear.weight.device), linear.bias,
                                                    input_quantizer=quantizer.to(linear.weight.device)))

        return install, record, layer

    def _calibrate_attention(self, unit, layout, trace: AttentionTrace, context: Trace, qkv: Trace):
        """Steps for q, k, v (the attention matmuls' inputs) and the post-softmax split, scored on the context."""
        c = self.config
        bits = c.act_bits
        attention = unit.module.get_submodule(layout.attention)
        width = qkv.y.shape[1] // 3
        bases = {key: (qkv.y[:, i * width:(i + 1) * width].abs().max() / (2 ** (bits - 1) - 0.5)).reshape(1)
                 for i, key in enumerate("qkv")}
        state = {**{key: base.clone() for key, base in bases.items()}, "split": torch.ones(1, device=qkv.y.device)}

        def error(candidate_state):
            outputs = _attention_contexts(attention, layout, trace, candidate_state, bits)
            diff = torch.cat(outputs) - context.x
            if c.metric == "hessian":
                diff = diff * context.x_grad
            return diff.square().mean(dtype=torch.float64).reshape(1)

        splits = [torch.full((1,), 2.0 ** -i, device=qkv.y.device) for i in range(SOFTMAX_SPLITS)]
        with torch.no_grad():
            for _ in range(c.rounds):
                for key in ("q", "k", "split", "v"):
                    candidates = splits if key == "split" else [bases[key] * f for f in c.factors()]
                    state[key], _ = search_scale(state[key], candidates, lambda s: error({**state, key: s}))

        def install():
            qkv_quantizer, probs_quantizer = _attention_quantizers(state, bits)
            attention.get_submodule(layout.attention_qkv).output_quantizer = qkv_quantizer
            replace_module(attention, layout.attention_probs, probs_quantizer)
            if hasattr(attention, "fused_attn"):
                attention.fused_attn = False  # the explicit path, where the probabilities pass through attn_drop

        return install


def _attention_contexts(attention, layout, trace: AttentionTrace, state, bits) -> list[torch.Tensor]:
    """Run the attention module with the given activation quantizers; return its context (output projection input) per batch."""
    contexts = []

    def capture(module, args):
        contexts.append(args[0].reshape(-1, args[0].shape[-1]))
        raise _Stop

    handles = _quantize_attention(attention, layout, state, bits)
    handles.append(attention.get_submodule(layout.attention_out).register_forward_pre_hook(capture))
    fused = getattr(attention, "fused_attn", None)
    try:
        for args, kwargs in trace.inputs:
            try:
                attention(*args, **kwargs)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
        if fused is not None:
            attention.fused_attn = fused
    return contexts


def _attention_quantizers(state, bits) -> tuple[UniformQuantizer, TwinSoftmaxQuantizer]:
    """q, k, v (thirds of the qkv output, one step each) and the attention probabilities."""
    steps = torch.cat([state["q"], state["k"], state["v"]])
    return UniformQuantizer(bits, step=steps).to(steps.device), TwinSoftmaxQuantizer(bits, split=state["split"]).to(steps.device)


def _quantize_attention(attention, layout, state, bits) -> list:
    """Hooks applying the attention quantizers during calibration; the explicit (unfused) attention path
    makes the probabilities visible to the hook."""
    if hasattr(attention, "fused_attn"):
        attention.fused_attn = False
    qkv_quantizer, probs_quantizer = _attention_quantizers(state, bits)
    return [attention.get_submodule(layout.attention_qkv).register_forward_hook(lambda m, a, out: qkv_quantizer(out)),
            attention.get_submodule(layout.attention_probs).register_forward_hook(lambda m, a, out: probs_quantizer(out))]


def _chunks(rows: int):
    for start in range(0, rows, TOKEN_CHUNK):
        yield slice(start, min(rows, start + TOKEN_CHUNK))


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False
