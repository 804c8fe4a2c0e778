"""HISA: Hierarchical Indexed Sparse Attention (Xu, Meng et al., arXiv 2603.28458), a drop-in replacement of
DeepSeek-V3.2's DSA indexer top-k.

Per query token t: blocks of ``block`` keys (aligned to multiples of ``block`` from the sample's first real
token), mean-pooled indexer keys k̃_b; stage 1 J[t, b] = Σ_j w_tj ReLU(q_tj . k̃_b) over causally visible
blocks, the first and last visible blocks forced (+inf, as the tilelang kernel), top-``m`` blocks; stage 2 the
original indexer score on those blocks' tokens only, top-``keep``. When the visible blocks number <= m the
selection is exactly the flat indexer's (IoU = 1).

Integration: forward hooks on each ``DeepseekV32Indexer`` (and on its ``wq_b``, ``k_norm`` and
``weights_proj`` to capture q, k, w); RoPE is applied with transformers' own ``apply_rotary_pos_emb``. The hook
replaces the indexer's output (top-k indices [B, S, k]); ``keep`` sets ``index_topk`` for the flat reference
too, and the IoU of every call against the flat output is accumulated in ``trace.stats``.

``flat_reference=True`` (default): the model's own flat indexer still runs and its output is the IoU reference
recorded in ``trace.stats`` (hisa_iou_sum / _n / _min) on every call, so the integration measures fidelity,
not speed. It is the default because the paper's fidelity claim is that IoU and kv-bench reports it.
``flat_reference=False``: the flat scores are never computed (the indexer's forward is wrapped and stopped
right after its key projection; HISA computes the weights with the indexer's own ``weights_proj`` and
appends the new keys to the HF indexer cache itself), so the in-model indexer is actually cheaper; no IoU is
recorded then. The indexer speed-up alone is measured on the ops (``tokensieve.kv.speed.indexer``).

Differences from the paper / tilelang code: scores in fp32 (the kernel pools fp8 keys and runs block top-k in
bf16); blocks align to the first real token so left padding cannot shift them. Pooled keys are maintained
per sample and layer (``ops.PooledKeys``: the new keys' block sums only), so a decode step reads the key cache
only for the m chosen blocks (plus the flat reference's full pass when it is on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import resolve_kv_keep
from ..ops import PooledKeys, hisa_topk, selection_iou
from .base import KVMethod, KVMethodError


@dataclass
class HISA(KVMethod):
    """block: B (paper 128); m: top blocks kept (paper 64, pool m * B = 8192 >= keep)."""

    name: ClassVar[str] = "hisa"
    fidelity: ClassVar[str] = "paper Alg. (block -> token), fp32; flat indexer kept as the in-model reference"
    families: ClassVar[tuple[str, ...]] = ("deepseek_v32",)
    block: int = 128
    m: int = 64
    flat_reference: bool = True

    def validate(self, info, keep) -> None:
        if self.block < 1 or self.m < 2:
            raise KVMethodError("hisa: block must be >= 1 and m >= 2 (the first and last blocks are forced)")
        if isinstance(keep, int) and self.m * self.block < keep:
            raise KVMethodError(f"hisa: m * block = {self.m * self.block} < keep={keep}; HISA needs m * B >= k")

    def install(self, sieve) -> None:
        sieve._handles, sieve._saved_topk = [], {}
        for name, mod in sieve.model.named_modules():
            if type(mod).__name__ == "DeepseekV32Indexer":
                sieve._saved_topk[name] = mod.index_topk
                self._hook(sieve, mod)

    def uninstall(self, sieve) -> None:
        for h in sieve._handles:
            h.remove()
        for name, mod in sieve.model.named_modules():
            if name in sieve._saved_topk:
                mod.index_topk = sieve._saved_topk[name]
                mod.__dict__.pop("forward", None)  # the wrapper of flat_reference=False

    def _wrap(self, sieve, mod, cap) -> None:
        """flat_reference=False: stop the indexer's forward after its key projection (raise from a k_norm hook)
        and return HISA's indices instead; the flat scores are never computed."""
        def stop(_m, _i, _out):
            raise _SkipFlat

        sieve._handles.append(mod.k_norm.register_forward_hook(stop))
        original = mod.forward

        def forward(*args, **kwargs):
            try:
                original(*args, **kwargs)
            except _SkipFlat:
                pass
            hidden = kwargs.get("hidden_states", args[0])
            cap["w"] = mod.weights_proj(hidden.to(mod.weights_proj.weight.dtype))
            return self._replace(sieve, mod, cap, args, kwargs, None)

        mod.forward = forward

    def _hook(self, sieve, mod) -> None:
        cap: dict = {}
        for sub, key in ((mod.wq_b, "q"), (mod.k_norm, "k"), (mod.weights_proj, "w")):
            sieve._handles.append(sub.register_forward_hook(lambda _m, _i, out, key=key: cap.__setitem__(key, out)))

        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[3] if len(args) > 3 else None)
            n_ctx = int(_visible(mask)[:, -1].sum(-1).max())
            if mask.shape[-1] == mask.shape[-2]:
                sieve.state[("hisa_ctx", module.layer_idx)] = n_ctx
            module.index_topk = resolve_kv_keep(sieve.keep, sieve.state.get(("hisa_ctx", module.layer_idx), n_ctx))

        def post(module, args, kwargs, flat):
            return self._replace(sieve, module, cap, args, kwargs, flat)

        sieve._handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        if self.flat_reference:
            sieve._handles.append(mod.register_forward_hook(post, with_kwargs=True))
        else:
            self._wrap(sieve, mod, cap)

    def _replace(self, sieve, module, cap, args, kwargs, flat: torch.Tensor | None) -> torch.Tensor:
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb

        hidden = kwargs.get("hidden_states", args[0])
        cos, sin = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
        mask = kwargs.get("attention_mask", args[3] if len(args) > 3 else None)
        bsz, s_len, _ = hidden.shape
        r = module.qk_rope_head_dim
        q = cap["q"].view(bsz, s_len, module.n_heads, module.head_dim)
        k = cap["k"].unsqueeze(2)
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q[..., r:]], dim=-1)
        k = torch.cat([k_rot, k[..., r:]], dim=-1).squeeze(2)
        layer = module.layer_idx
        past = sieve.state.get(("hisa_k", layer))
        if flat is None and kwargs.get("cache") is not None:  # the skipped forward did not append them
            k = kwargs["cache"].update_indexer(k, layer)  # the full indexer keys, as the flat indexer uses
        else:
            k = k if past is None or mask.shape[-1] == s_len else torch.cat([past, k], dim=1)
            sieve.state[("hisa_k", layer)] = k
        w = cap["w"].float() * module.n_heads**-0.5
        visible = _visible(mask)
        if mask.shape[-1] == s_len and layer == min(sieve.state.get("first_layer", layer), layer):
            sieve.state["first_layer"] = layer
            sieve.trace.reset()
        topk = min(module.index_topk, k.shape[1])
        pools = sieve.state.setdefault(("hisa_pool", layer), {})
        if mask.shape[-1] == s_len:  # a new request: pooled keys start over
            pools.clear()
        out, sets, iou = self._select(q, w, k, visible, topk, module.softmax_scale, flat, pools)
        if iou is not None:
            stats = sieve.trace.stats
            stats["hisa_iou_sum"] = stats.get("hisa_iou_sum", 0.0) + float(iou.sum())
            stats["hisa_iou_n"] = stats.get("hisa_iou_n", 0) + iou.numel()
            stats["hisa_iou_min"] = min(stats.get("hisa_iou_min", 1.0), float(iou.min()))
        sieve.trace.record(layer, sets)
        return out

    def _select(self, q, w, k, visible, topk: int, scale: float, flat: torch.Tensor | None, pools: dict):
        """Per sample, on its valid keys (blocks start at its first real token): indices [B, S, topk] (int32, like
        the flat indexer's), the last query's set per sample, and the per-query IoU against ``flat`` (or None)."""
        s_len = q.shape[1]
        out = torch.empty(q.shape[0], s_len, topk, dtype=torch.int32, device=q.device)
        sets, ious = [], []
        for b in range(q.shape[0]):
            cols = torch.nonzero(visible[b, -1]).view(-1)
            vis = visible[b][:, cols]
            rows = vis.any(-1)
            idx = torch.zeros(s_len, topk, dtype=torch.long, device=q.device)
            kb = k[b, cols]
            means = pools.setdefault(b, PooledKeys(self.block)).update(kb)  # maintained, new keys only
            sel = hisa_topk(q[b, rows], w[b, rows], kb, vis[rows], topk, self.block, self.m, scale,
                            pooled=(means, None))
            idx[rows, : sel.shape[1]] = cols[sel]
            idx[rows, sel.shape[1] :] = cols[sel[:, :1]] if sel.shape[1] < topk else 0
            out[b] = idx.to(torch.int32)
            if flat is not None:
                ious.append(selection_iou(idx[rows], flat[b, rows], visible[b, rows]))
            last = idx[-1][visible[b, -1][idx[-1]]]
            sets.append(last.unique().view(1, -1))
        return out, sets, (torch.cat(ious) if ious else None)


class _SkipFlat(Exception):
    """Raised from the indexer's k_norm hook to stop its forward before the flat scores (flat_reference=False)."""


def _visible(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask.clone()
    return mask > torch.finfo(mask.dtype).min / 2
