"""Stage runners: pre-LLM stages at the input of decoder layer 0, llm stages at the input of layer K.

Both share one apply path, :func:`apply_stage`: per image, build the context, ``select`` -> check -> replace
merged rows -> drop the rest -> record the Trace. The runners differ only in how they find an image's candidate
rows and build its context.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters.base import Adapter
from ..context import Selection
from ..methods.base import Method
from ..trace import StageRecord
from .contexts import batch_capture, image_context, llm_context
from .layout import compact, rows_of
from .plan import LAYER_SIGNALS, Plan
from .state import PlacedImage, Request

# (image) -> (candidate indices into the image's tokens [n], their rows in the layout [n])
Candidates = Callable[[PlacedImage, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ContextFn = Callable[[PlacedImage, torch.Tensor, torch.Tensor, torch.Tensor], object]


@torch.no_grad()  # selection is a discrete decision: no autograd graph, in-place ops allowed
def _select(method: Method, ctx, k: int):
    return method.select(ctx, k)


def check_selection(method: Method, result, n: int, k: int):
    """(sorted unique kept indices, replace_at, replace_with) from what ``select`` returned."""
    replace_at = replace_with = None
    if isinstance(result, Selection):
        replace_at, replace_with = result.replace_at, result.replace_with
        result = result.keep
    chosen = torch.as_tensor(result).flatten().long()
    if chosen.numel() == 0:
        if k == 0:  # a budget of zero drops the whole image (ToDRE's late layers)
            return chosen, None, None
        raise RuntimeError(f"tokensieve: {method.name} kept no token although its budget is {k}")
    if int(chosen.min()) < 0 or int(chosen.max()) >= n:
        raise RuntimeError(f"tokensieve: {method.name} returned an index outside [0, {n})")
    return torch.unique(chosen), replace_at, replace_with  # sorted: kept tokens stay in their original order


def apply_stage(
    method: Method,
    record: StageRecord,
    request: Request,
    hidden: torch.Tensor,
    keep_rows: torch.Tensor,
    candidates: Candidates,
    context: ContextFn,
    budget: Callable[[int], int],
) -> torch.Tensor:
    """Run ``method`` on every image of the request; returns ``hidden`` (a copy where tokens were merged)."""
    for img in request.images:
        b = img.sample
        cand, rows = candidates(img, keep_rows)
        k = budget(img.n_tokens)
        if k < cand.numel():
            ctx = context(img, cand, rows, hidden)
            chosen, replace_at, replace_with = check_selection(method, _select(method, ctx, k), cand.numel(), k)
            chosen = chosen.to(cand.device)
            if replace_at is not None:
                hidden = hidden.clone()
                hidden[b, rows[replace_at.to(rows.device)]] = replace_with.to(hidden.device, hidden.dtype)
            drop = torch.ones(cand.numel(), dtype=torch.bool, device=cand.device)
            drop[chosen] = False
            keep_rows[b, rows[drop]] = False
            cand = cand[chosen]
        record.kept[(b, img.image)] = cand.cpu()  # cand indexes the image's original tokens
        record.n_tokens[(b, img.image)] = img.n_tokens
    return hidden


def run_pre_llm(adapter: Adapter, plan: Plan, request: Request, hidden: torch.Tensor) -> torch.Tensor:
    """Vision and projector stages, on the original layout at the input of decoder layer 0."""
    keep_rows = request.layout_valid.clone()

    def candidates(img: PlacedImage, keep: torch.Tensor):
        positions = img.positions.to(keep.device)
        cand = torch.nonzero(keep[img.sample, positions]).flatten()
        return cand, positions[cand]

    def context(img, cand, rows, hidden):
        return image_context(adapter, plan, request, img, cand, hidden[img.sample, rows])

    for method in plan.pre_llm:
        record = StageRecord(name=method.name, layer=0)
        hidden = apply_stage(
            method, record, request, hidden, keep_rows, candidates, context,
            lambda n, m=method: m.budget(n, n_layers=plan.n_layers),
        )  # fmt: skip
        request.trace.stages.append(record)
    return compact(request, 0, keep_rows, plan.policy(plan.pre_llm[-1]), hidden)


def _captures(adapter: Adapter, request: Request, method: Method, layer: int, n_layers: int) -> dict[int, dict]:
    out = {}
    if LAYER_SIGNALS & set(method.needs):
        for j in method.capture_layers(layer, n_layers):
            out[j] = batch_capture(adapter, request, j, "attention" in method.needs)
    if "own_qk" in method.needs:
        out[layer] = request.own_qk[layer]
    return out


def run_llm_stage(adapter: Adapter, plan: Plan, request: Request, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """The llm stages of decoder ``layer``, on the layout that reaches it."""
    keep_rows = request.layout_valid.clone()
    n_layers = plan.n_layers

    def candidates(img: PlacedImage, keep: torch.Tensor):
        rows_of_image = rows_of(request, img.sample, img.positions)  # [n] rows in the layout, -1 if gone
        present = (rows_of_image >= 0) & keep[img.sample, rows_of_image.clamp(min=0)]
        cand = torch.nonzero(present).flatten()
        return cand, rows_of_image[cand]

    for method in plan.llm_stages[layer]:
        stage_index = method.llm_layers(n_layers).index(layer)
        captures = _captures(adapter, request, method, layer, n_layers)

        def context(img, cand, rows, hidden, stage_index=stage_index, captures=captures):
            return llm_context(adapter, request, img, layer, stage_index, cand, rows, hidden, captures)

        record = StageRecord(name=method.name, layer=layer)
        hidden = apply_stage(
            method, record, request, hidden, keep_rows, candidates, context,
            lambda n, m=method, s=stage_index: m.budget(n, stage_index=s, n_layers=n_layers),
        )  # fmt: skip
        request.trace.stages.append(record)
    return compact(request, layer, keep_rows, plan.policy(plan.llm_stages[layer][-1]), hidden)
