"""EntropyPrune: keep the visual tokens whose multi-head query carries the most matrix entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..context import LLMContext
from ..ops import matrix_entropy_per_token, topk_indices
from ._layers import llm_layer
from .base import LLMMethod, register


@register
@dataclass
class EntropyPrune(LLMMethod):
    """EntropyPrune (arXiv 2602.17196): matrix-entropy token scores at the "Entropy Collapse Layer".

    Stage ``llm`` at ``layer`` K (default: the collapse layer K=2 the paper reports for LLaVA-1.5-7B, scaled
    with depth as ``max(1, round(2 * n_layers / 32))``, :mod:`tokensieve.methods._layers`; find it for another
    model with :func:`find_entropy_collapse_layer`). Signals: the queries of layer K-1 after RoPE
    ([H, L, d], captured by the framework). For each image token its query is reshaped to ``[H, d]``, centred
    across heads, and the entropy ``-sum l log l / log H`` of the eigenvalues of the dual Gram matrix
    ``R R^T / H`` is computed (:func:`tokensieve.ops.matrix_entropy_per_token`, float64 ``eigvalsh``, no trace
    normalisation, as in the code, so eigenvalues above 1 add negative terms). The ``k`` tokens of highest
    entropy are kept. RoPE rotates every head of a token by the same angles, so the entropy does not depend on
    whether queries are taken before or after it.

    Positions: ``original`` (``position_ids = keep_indexs``).

    Budget: ``keep`` is the count kept from layer K on. With ``average_budget=True`` it is the layer-averaged
    budget of the paper's tables and is converted by :func:`tokensieve.budget.layer_average_to_stage_count`,
    ``s = (L * avg - K * N) / (L - K)`` (166/98/29 for 192/128/64 on LLaVA-1.5-7B).

    Differences from the official code (``YahongWang1/EntropyPrune`` ``modeling_llama_self.py::maten_prune``):
    the head dimension is not average-pooled to ``dim_scale`` (the code's ``dim_scale=128`` is a no-op for the
    7B models' head_dim 128); only the query variant (the code's default ``SELECTED_MAT``) is offered.
    """

    keep: float | int = 0.25
    layer: int | None = None  # None: the paper's K=2 scaled with depth

    name = "entropyprune"
    needs = frozenset({"hidden", "attention"})
    paper = "EntropyPrune: matrix-entropy visual token pruning at the entropy collapse layer"
    arxiv = "2602.17196"

    def llm_layers(self, n_layers: int) -> list[int]:
        return [llm_layer(self.layer, 2, n_layers, name="entropyprune: layer")]

    def select(self, ctx: LLMContext, k: int) -> torch.Tensor:
        cap = ctx.capture()
        if cap.queries is None:
            raise RuntimeError("entropyprune needs the queries of layer K-1: declare 'attention' in needs")
        per_head = cap.queries[:, ctx.image_rows()].transpose(0, 1)  # [n, H, d]
        return topk_indices(matrix_entropy_per_token(per_head), k)


@torch.no_grad()
def image_query_entropy_per_layer(model: nn.Module, inputs: dict) -> list[float]:
    """Mean matrix entropy of the image tokens' queries at every decoder layer of one unpruned forward pass.

    Forward hooks on each layer's ``q_proj`` read its output (before RoPE, which does not change the entropy);
    image tokens are the ``image_token_id`` placeholders that are not padding. All hooks are removed in
    ``finally``.
    """
    from ..adapters.base import get_adapter  # the generic lookup; no family is named here

    adapter = get_adapter(model)
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    is_image = input_ids == adapter.image_token_id
    if mask is not None:
        is_image &= mask.bool()
    if not bool(is_image.any()):
        raise ValueError("find_entropy_collapse_layer: the inputs hold no image tokens")

    n_layers = adapter.n_layers
    entropies: list[float | None] = [None] * n_layers
    handles = []

    def make_hook(i: int, heads: int, head_dim: int):
        def hook(module, args, output):
            q = output[0] if isinstance(output, tuple) else output  # [B, L, H * d]
            if q.shape[1] != input_ids.shape[1]:
                return  # not the prefill of these inputs
            per_head = q[is_image.to(q.device)].reshape(-1, heads, head_dim)
            entropies[i] = float(matrix_entropy_per_token(per_head).mean())

        return hook

    try:
        for i in range(n_layers):
            q_proj, _, heads, _, head_dim = adapter.qk_projections(i)
            handles.append(q_proj.register_forward_hook(make_hook(i, heads, head_dim)))
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if any(e is None for e in entropies):
        raise RuntimeError("find_entropy_collapse_layer: some decoder layers were not reached")
    return [float(e) for e in entropies]


def find_entropy_collapse_layer(model: nn.Module, inputs: dict) -> int:
    """The decoder layer where the image tokens' query entropy collapses, to pass as ``EntropyPrune(layer=...)``.

    Criterion: with ``e_l`` the mean matrix entropy of the image tokens' queries at layer ``l``
    (:func:`image_query_entropy_per_layer`, one unpruned forward pass of ``inputs``), the collapse layer is
    ``argmax_{l >= 1} (e_{l-1} - e_l)``: the layer whose entropy is lowest relative to the layer before, i.e.
    the largest one-layer drop (ties: the earliest layer). Pruning at that layer scores tokens with the
    queries of layer ``l - 1``, the last layer before the collapse. The paper reports layer 2 for LLaVA-1.5-7B.

    Parameters
    ----------
    model : a supported HF VLM (the adapters' families), outside any sieve.
    inputs : processor output (``input_ids``, ``attention_mask``, ``pixel_values``, ...); a few typical
        samples in one batch give a steadier estimate.

    Returns
    -------
    int
        A layer in ``[1, n_layers - 1]``.
    """
    e = image_query_entropy_per_layer(model, inputs)
    if len(e) < 2:
        raise ValueError("find_entropy_collapse_layer needs a model with at least 2 decoder layers")
    drops = [e[i - 1] - e[i] for i in range(1, len(e))]
    return 1 + max(range(len(drops)), key=lambda i: (drops[i], -i))
