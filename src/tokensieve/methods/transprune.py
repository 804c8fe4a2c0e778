"""TransPrune: token transition variation (TTV) plus instruction-guided attention (IGA), pruned progressively."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import resolve_keep
from ..context import LayerCapture, LLMContext
from ._own_qk import FALLBACK_NOTE, OWN_QK_SUPPORTED, attention_needs, score_layer
from ._schedule import PAPER_DEPTH, check_layers, fit_stages, scale_layers, solve_schedule
from .base import LLMMethod, MethodError, register


def transition_variation(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TTV weight [L] of one module: ``(||after|| / ||before||) * softmax_over_tokens(1 - cos(before, after))``.

    ``before`` [L, D] is the module's normed input, ``after`` [L, D] its output (not the residual sum); the
    softmax runs over the valid tokens of the whole sequence (padding gets weight 0).
    """
    b, a = before.float(), after.float()
    b_norm, a_norm = b.norm(dim=-1), a.norm(dim=-1)
    cos = (a * b).sum(-1) / (a_norm * b_norm).clamp_min(1e-8)
    logits = (1.0 - cos).masked_fill(~valid, float("-inf"))  # official: exp(1 - cos) / sum, batch 1
    return (a_norm / b_norm.clamp_min(1e-8)) * torch.softmax(logits, dim=0).masked_fill(~valid, 0.0)


def layer_ttv(cap: LayerCapture) -> torch.Tensor:
    """TTV [L_j] of one decoder layer: attention block plus FFN block."""
    if cap.attn_in is None or cap.attn_out is None or cap.mlp_in is None or cap.mlp_out is None:
        raise RuntimeError("transprune needs the sublayer inputs and outputs: declare 'sublayer_io' in needs")
    return transition_variation(cap.attn_in, cap.attn_out, cap.valid) + transition_variation(
        cap.mlp_in, cap.mlp_out, cap.valid
    )


@register
@dataclass
class TransPrune(LLMMethod):
    """TransPrune (CVPR 2026, arXiv 2507.20630): token transition variation and instruction-guided attention.

    Stage ``llm`` at several layers, progressively: on a 32-layer LLM the official LLaVA-1.5 script prunes from
    0-based layers ``[7, 9, 12]`` (after 1-based layers 7, 9, 12) to ``[0.875, 0.625, 0.125]`` of the image's
    tokens, accumulating TTV over layers 6..11 (1-based 7..12). Layers scale with depth as
    ``max(1, round(K32 * n_layers / 32))`` (:mod:`tokensieve.methods._layers`; ``layer_fractions``,
    ``accumulate_fraction``) or are set by ``layers`` / ``accumulate_from``.

    Signals and score at stage layer ``l``:

    - TTV: for every accumulated layer ``j`` in ``[accumulate_from, l)`` (the framework captures only layers
      before the stage layer) and each of its two modules (attention, FFN), ``before`` = normed module input,
      ``after`` = module output, both [L_j, D] (``sublayer_io``);
      ``w = (||after|| / ||before||) * softmax_over_sequence(1 - cos(before, after))``; TTV = sum over modules
      and layers, restricted to the image's candidates [n].
    - IGA: attention of all instruction tokens (text after the image) over the image, recomputed from the
      stage layer's *own* q/k after RoPE on its input (signal ``own_qk``, as the official
      ``transprune_rank_drop`` applies layer ``l``'s ``input_layernorm``, ``q_proj``, ``k_proj``), averaged over
      heads and rows [n] (:meth:`LLMContext.instruction_attention`).
    - ``score = TTV / (sum(TTV) + 1e-8) + IGA / (sum(IGA) + 1e-8)``; the top count is kept (``torch.topk``).

    Budget: ``keep`` is the ratio after the *last* stage (default 0.125, the official final ratio); stage
    ``s`` keeps ``int(n * ratios[s] * keep / ratios[-1])`` (floor; at the default ``int(n * ratios[s])``, the
    official ``int(image_tokens * image_token_ratio_list[s])``: 87, 62, 12 at n=100). An int ``keep`` is the
    final count (earlier stages scaled from ``keep / n``). With ``average_budget=True``
    ``keep`` is the layer-averaged count: the ratio shape is scaled by a factor solved so the layer average is
    the largest not above ``keep`` (:func:`tokensieve.budget.stages_layer_average`). The layers before the
    first stage keep every token, so an average below ``first / L`` of the image (126 of 576 on 32 layers)
    cannot be met: move the stages earlier with ``layers``.

    Positions: ``reindex`` (contiguous, decode positions shifted by what was pruned, as the official code does);
    ``original`` on M-RoPE families (the framework's rule).

    Differences from the official code (``liaolea/TransPrune`` ``llava/model/modeling_llama_transprune.py``):
    padding tokens are excluded from the TTV softmax (the code runs batch 1); when stages are scaled to a
    shallow model the accumulation start is moved before the first stage layer. Where the framework has no
    ``own_qk`` signal, IGA falls back to the q/k of layer ``l - 1`` and the ``fidelity`` note says so.
    """

    keep: float | int = 0.125
    layer: int = 7  # unused when `layers`/`layer_fractions` set the schedule; kept for the shared signature
    layers: tuple[int, ...] | None = None
    layer_fractions: tuple[float, ...] = (7 / PAPER_DEPTH, 9 / PAPER_DEPTH, 12 / PAPER_DEPTH)
    ratios: tuple[float, ...] = (0.875, 0.625, 0.125)
    accumulate_from: int | None = None
    accumulate_fraction: float = 6 / PAPER_DEPTH

    name = "transprune"
    needs = attention_needs("hidden", "sublayer_io")
    fidelity = "faithful" if OWN_QK_SUPPORTED else FALLBACK_NOTE
    default_positions = "reindex"
    paper = "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (CVPR 2026)"
    arxiv = "2507.20630"

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(not 0.0 < r <= 1.0 for r in self.ratios) or list(self.ratios) != sorted(self.ratios)[::-1]:
            raise MethodError("transprune: ratios must be non-increasing fractions in (0, 1]")

    def llm_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            layers = check_layers(self.name, self.layers, n_layers)
        else:
            layers = scale_layers(self.layer_fractions, n_layers)
        if self.layers is not None and len(layers) != len(self.ratios):
            raise MethodError(f"transprune: {len(self.ratios)} ratios for {len(layers)} stage layers")
        return layers

    def accumulate_start(self, n_layers: int) -> int:
        if self.accumulate_from is not None:
            return self.accumulate_from
        first = self.llm_layers(n_layers)[0]
        return max(0, min(round(self.accumulate_fraction * n_layers), first - 1))

    def capture_layers(self, layer: int, n_layers: int) -> list[int]:
        return list(range(min(self.accumulate_start(n_layers), layer - 1), layer))

    def stage_counts(self, n_tokens: int, n_layers: int) -> list[int]:
        """Visual tokens kept after each stage."""
        layers = self.llm_layers(n_layers)
        ratios = fit_stages(self.ratios, len(layers))  # a shallow model runs fewer stages
        last = ratios[-1]

        def counts(t: float) -> list[int]:
            scale = t / last
            return [max(1, min(n_tokens, int(n_tokens * (r * scale)))) for r in ratios]

        if self.average_budget:
            return solve_schedule(counts, resolve_keep(self.keep, n_tokens), layers, n_tokens, n_layers)
        final = resolve_keep(self.keep, n_tokens)
        out = counts(self.keep if isinstance(self.keep, float) else final / n_tokens)
        out[-1] = final
        return [max(c, final) for c in out]

    def budget(self, n_tokens: int, *, stage_index: int = 0, n_layers: int = 0) -> int:
        return self.stage_counts(n_tokens, n_layers)[stage_index]

    def scores(self, ctx: LLMContext) -> torch.Tensor:
        ttv = torch.zeros(ctx.n, dtype=torch.float32, device=ctx.hidden.device)
        for j in self.capture_layers(ctx.layer, ctx.n_layers):
            cap = ctx.capture(j)
            ttv = ttv + layer_ttv(cap)[cap.rows(ctx.image_cols)].to(ttv.device)
        iga = ctx.instruction_attention(score_layer(ctx.layer)).float()
        return ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        return torch.topk(self.scores(ctx), k).indices
