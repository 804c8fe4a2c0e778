"""KVSieve: route a causal LM's attention through a KV selection method, and undo it on exit.

It registers one attention function in transformers' ``AttentionInterface`` (plus the matching mask function)
under a name unique to this sieve, and points ``model.config._attn_implementation`` at it. The function
receives q/k/v after RoPE and after the cache update; when the method attends everything, it calls the
model's original implementation (sdpa or eager) unchanged, so the logits are bit-exact. On exit, even after an
exception, the config and both registries are restored: the model is unchanged.
"""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attend import attend
from .budget import resolve_kv_keep, validate_kv_keep
from .families import ATTENTION_FAMILIES, model_info
from .methods import Call, KVMethod, KVMethodError, make_kv_method
from .trace import KVTrace

_IDS = itertools.count()
_ORIGINAL = ("sdpa", "eager")


class KVSieve:
    """``with KVSieve(model, "tokenselect", keep=2048) as s: model.generate(...)``; then ``s.trace``.

    ``keep``: KV tokens each query attends (int) or a fraction of the prompt (float in (0, 1]).
    ``profile=True`` accumulates selection vs attention time in ``trace.stats`` (for kv-bench).
    ``shadow=True`` (kv-bench fidelity): the model keeps its dense trajectory; the method runs beside it on
    identical q/k/v and ``trace.stats`` accumulates the last query's attention-output error vs dense, recall of
    the exact per-head top-k and the dense attention mass captured.
    """

    def __init__(self, model: nn.Module, method: str | KVMethod, keep: int | float = 2048, *,
                 profile: bool = False, shadow: bool = False, **hyperparameters) -> None:
        self.info = model_info(model)
        self.keep = validate_kv_keep(keep)
        self.method = make_kv_method(method, **hyperparameters)
        if self.info.family not in self.method.families:
            raise KVMethodError(
                f"{self.method.name} does not run on {self.info.family}; it supports "
                f"{', '.join(self.method.families)}"
            )
        self.method.validate(self.info, self.keep)
        if self.info.family in ATTENTION_FAMILIES and self.info.attn_implementation not in _ORIGINAL:
            raise KVMethodError(
                f"attn_implementation={self.info.attn_implementation!r}: the KV sieve wraps 'sdpa' or 'eager'; "
                f"load the model with attn_implementation='sdpa'."
            )
        self.model = model
        self.profile = profile
        self.shadow = shadow
        self.trace = KVTrace()
        self.state: dict = {}
        self._name = f"tokensieve_kv_{next(_IDS)}"
        self._active = False

    # ---- install / remove -------------------------------------------------------------------------------
    def __enter__(self) -> KVSieve:
        if self._active:
            raise RuntimeError("this KVSieve is already active; create a new one")
        self.method.prepare(self.model, self.info, self.keep)
        if hasattr(self.method, "install"):
            self.method.install(self)
        else:
            self._orig_name = self.info.attn_implementation
            self._orig_fn = ALL_ATTENTION_FUNCTIONS[self._orig_name] if self._orig_name != "eager" else None
            AttentionInterface.register(self._name, self._attention)
            ALL_MASK_ATTENTION_FUNCTIONS.register(self._name, ALL_MASK_ATTENTION_FUNCTIONS[self._orig_name])
            self.model.config._attn_implementation = self._name
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._active:
            return
        self._active = False
        if hasattr(self.method, "uninstall"):
            self.method.uninstall(self)
            return
        self.model.config._attn_implementation = self._orig_name
        AttentionInterface._global_mapping.pop(self._name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(self._name, None)

    def _original(self, module, *args, **kwargs):
        if self._orig_fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward

            return eager_attention_forward(module, *args, **kwargs)
        return self._orig_fn(module, *args, **kwargs)

    # ---- the registered attention function ---------------------------------------------------------------
    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = int(module.layer_idx)
        bsz, _, q_len, _ = query.shape
        n_all = key.shape[2]
        phase = "prefill" if n_all == q_len else ("decode" if q_len == 1 else "extend")
        valid = _key_valid(attention_mask, bsz, n_all, key.device)
        positions = self._positions(layer, kwargs.get("position_ids"), phase, bsz, q_len, n_all, key.device)
        if phase == "prefill":
            if layer == min(self.state.get("first_layer", layer), layer):
                self.state = {"first_layer": layer}
                self.trace.reset()
            self.state[("n_context", layer)] = valid.sum(-1).tolist()
            self.state[("pos", layer)] = positions
        n_valid = valid.sum(-1).tolist()
        n_ctx = self.state.get(("n_context", layer), n_valid)
        keeps = [resolve_kv_keep(self.keep, c) for c in n_ctx]
        dense = all(self.method.is_dense(n, k, phase, layer) for n, k in zip(n_valid, keeps, strict=True))
        if dense or self.shadow:
            result = self._original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
        if dense:
            self.trace.record_dense(layer, valid)
            return result
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = self._sparse(module, query, key, value, valid, positions, phase, layer, keeps, n_ctx, scaling,
                           result[0] if self.shadow else None)
        return result if self.shadow else (out, None)

    def _sparse(self, module, query, key, value, valid, positions, phase, layer, keeps, n_ctx, scaling, dense):
        """The method's plan and attention, one sample at a time -> [B, q, H, d]; records the trace."""
        bsz, _, q_len, _ = query.shape
        out = query.new_zeros(bsz, q_len, query.shape[1], query.shape[-1])
        sets = []
        for b in range(bsz):
            call, rows, cache_idx = self._call(b, query, key, value, valid, positions, phase, layer,
                                               keeps[b], n_ctx[b], scaling, module)
            t0 = time.perf_counter()
            pieces = self.method.plan(call)
            t1 = time.perf_counter()
            out_b = attend(call, pieces)
            if self.profile:
                self._tick(t0, t1, time.perf_counter())
            out[b, rows] = out_b[0].transpose(0, 1).to(out.dtype)
            sets.append(_last_query_set(call, pieces[-1], cache_idx))
            if dense is not None:
                from .fidelity import accumulate

                accumulate(self.trace.stats, call, pieces[-1], out_b[0, :, -1], dense[b, -1])
        self.trace.record(layer, sets)
        return out

    def _call(self, b, query, key, value, valid, positions, phase, layer, keep, n_ctx, scaling, module):
        q_len, n_all = query.shape[2], key.shape[2]
        vb = valid[b]
        cache_idx = torch.nonzero(vb).view(-1)
        rows = vb[n_all - q_len :]
        compact = torch.cumsum(vb.long(), 0) - 1
        if bool(vb.all()):
            k, v = key[b : b + 1], value[b : b + 1]
        else:
            k, v = key[b : b + 1, :, cache_idx], value[b : b + 1, :, cache_idx]
        q = query[b : b + 1, :, rows] if not bool(rows.all()) else query[b : b + 1]
        q_pos = compact[n_all - q_len :][rows]
        pos = positions[b]
        call = Call(q=q, k=k, v=v, q_pos=q_pos, k_rope=pos[cache_idx], q_rope=pos[n_all - q_len :][rows],
                    phase=phase, layer=layer, keep=keep, n_context=n_ctx, scaling=scaling, model=self.model,
                    info=self.info, state=self.state, slot=(layer, b), stats=self.trace.stats)
        return call, rows, cache_idx

    def _positions(self, layer, position_ids, phase, bsz, q_len, n_all, device) -> torch.Tensor:
        if position_ids is None:
            new = torch.arange(n_all - q_len, n_all, device=device).expand(bsz, q_len)
        else:
            new = position_ids.to(device).expand(bsz, q_len)
        past = self.state.get(("pos", layer))
        if phase == "prefill" or past is None:
            full = torch.arange(n_all, device=device).expand(bsz, n_all).clone()
            full[:, n_all - q_len :] = new
        else:
            full = torch.cat([past, new], dim=1)[:, -n_all:]
        self.state[("pos", layer)] = full
        return full

    def _tick(self, t0: float, t1: float, t2: float) -> None:
        stats = self.trace.stats
        stats["select_s"] = stats.get("select_s", 0.0) + (t1 - t0)
        stats["attend_s"] = stats.get("attend_s", 0.0) + (t2 - t1)


def _key_valid(mask: torch.Tensor | None, bsz: int, n: int, device) -> torch.Tensor:
    """[B, N] bool: which cache entries are real tokens (read from the last query row of the 4-D mask)."""
    if mask is None:
        return torch.ones(bsz, n, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, -n:] if mask.dim() == 4 else mask[:, -n:]
    if row.dtype == torch.bool:
        return row.expand(bsz, n).clone()
    return (row > torch.finfo(row.dtype).min / 2).expand(bsz, n).clone()


def _last_query_set(call: Call, piece, cache_idx: torch.Tensor) -> torch.Tensor:
    """Cache positions the last query of the call attended: [G, k] (-1 = none)."""
    last = call.q_pos[-1]
    if piece.idx is None:
        keys = torch.arange(call.n, device=cache_idx.device)
        sel = keys <= last
        if piece.mask is not None:
            sel = piece.mask[:, -1] & sel
            return torch.stack([_pad_nonzero(row, cache_idx, call.n) for row in sel])
        return cache_idx[sel].view(1, -1)
    idx = piece.idx.clone()
    ok = (idx >= 0) & (idx <= last)
    if piece.valid is not None:
        ok &= piece.valid
    return torch.where(ok, cache_idx[idx.clamp(min=0)], torch.full_like(idx, -1))


def _pad_nonzero(row: torch.Tensor, cache_idx: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.full((n,), -1, dtype=torch.long, device=row.device)
    pos = cache_idx[row]
    out[: pos.numel()] = pos
    return out
