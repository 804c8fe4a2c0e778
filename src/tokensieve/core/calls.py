"""What the hooks do at each call: the multimodal model, the text model and every decoder layer.

Prefill: the model pre-hook opens a :class:`Request` (per thread); the pre-hook of decoder layer 0 places the
images and runs the pre-LLM stages; the pre-hook of layer K runs its llm stages; from a pruning layer on, every
layer gets the compacted rows, a mask built for them and rotary embeddings for the stage's position policy.
Decoding: pruned layers get a mask over their own (shorter) cache and, under ``reindex``, shifted positions.
The text model's output is scattered back to the prompt's length, so logits line up with ``input_ids``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..adapters.base import Adapter
from ..trace import Trace
from . import images as image_records
from . import layout, outputs
from .plan import Plan
from .stages import run_llm_stage, run_pre_llm
from .state import Request, States


class NoImageTokensWarning(UserWarning):
    """A prompt reached the model without ``<image>`` placeholders: it runs unpruned."""


def _warn(message: str) -> None:
    warnings.warn(f"tokensieve: {message}", NoImageTokensWarning, stacklevel=4)


def _query_length(args, kwargs) -> int:
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[1]
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids.shape[1]


def _with_hidden(args, kwargs, hidden, new_kwargs):
    if args:
        return (hidden, *args[1:]), new_kwargs
    new_kwargs["hidden_states"] = hidden
    return args, new_kwargs


class Calls:
    """The per-call logic behind the hooks (installed by :mod:`tokensieve.core.hooks`)."""

    def __init__(self, adapter: Adapter, plan: Plan, states: States, publish: Callable[[Trace], None]):
        self.adapter, self.plan, self.states, self.publish = adapter, plan, states, publish
        self.warned_no_image = False

    # ----- the multimodal model ------------------------------------------------------------------------------
    def on_model_call(self, module, args, kwargs):
        state = self.states.get()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past != 0:
            if state.request is not None:
                state.request.prefill = False
            return None
        state.request = None
        if input_ids is None:
            if self.plan.methods:
                _warn("the model was called with inputs_embeds instead of input_ids, so the <image> placeholders "
                      "cannot be located; this call runs unpruned.")  # fmt: skip
            return None
        if not bool((input_ids == self.adapter.image_token_id).any()):
            if not self.warned_no_image:
                _warn("the prompt has no image tokens; it runs unpruned. Put the processor's image placeholder "
                      "(e.g. '<image>') in the text to prune its visual tokens.")  # fmt: skip
                self.warned_no_image = True
            return None
        mask = kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask[:, -input_ids.shape[1] :].bool()
        request = Request(input_ids=input_ids, valid=valid)
        if kwargs.get("pixel_values") is not None:
            request.encoded_from = len(state.records)  # this forward encodes its images itself
        else:
            request.encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        state.request = request
        return None

    def on_model_output(self, module, args, output):
        state = self.states.get()
        if state.generate_depth == 0:
            state.records.clear()  # a plain forward's encodings are used up; generate() keeps them until it returns
        return None

    # ----- the text model ------------------------------------------------------------------------------------
    def on_text_call(self, module, args, kwargs):
        request = self.states.get().request
        if request is None:
            return None
        mask = kwargs.get("attention_mask")
        request.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        position_ids = self.adapter.decoder_position_ids(kwargs.get("position_ids"))
        if request.prefill:
            if position_ids is None:  # the decoder's own default: arange over the prompt, pads included
                position_ids = torch.arange(request.length, device=request.valid.device).expand(request.batch, -1)
            elif position_ids.dim() == 2 and position_ids.shape[0] != request.batch:
                position_ids = position_ids.expand(request.batch, -1)
            request.orig_positions = position_ids
            flat = position_ids if position_ids.dim() == 2 else position_ids.amax(0)
            request.next_orig = flat.masked_fill(~request.valid.to(flat.device), -1).amax(-1) + 1
            return None
        return self._decode_text_call(request, args, kwargs, position_ids)

    def _decode_text_call(self, request: Request, args, kwargs, position_ids):
        q_len = _query_length(args, kwargs)
        done = request.decoded
        request.decoded += q_len
        if position_ids is None:
            position_ids = request.next_orig[:, None] + done + torch.arange(q_len, device=request.next_orig.device)
        request.decode_positions = position_ids
        first = request.segments[0] if request.segments else None
        if first is None or first.start != 0:
            return None
        # Layer 0 caches only the kept tokens: give the decoder a 2-D mask of the same length, so its own mask
        # bookkeeping agrees with the cache (the pruned layers get their own masks anyway).
        new = self._decode_key_validity(request).to(first.valid.device)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([first.valid, new], dim=1).long()
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = position_ids
        return args, kwargs

    def on_text_output(self, module, args, output):
        request = self.states.get().request
        if request is None or not request.segments:
            return None
        if not request.prefill:
            outputs.realign_decode(request, output)
            return output
        output.last_hidden_state = layout.scatter_rows(output[0], request.cols, request.layout_valid, request.length)
        outputs.realign_prefill(request, output)
        return output

    @staticmethod
    def _decode_key_validity(request: Request) -> torch.Tensor:
        """Validity [B, n_new] of the keys generated after the prompt (this call's tokens included)."""
        if request.mask2d is not None and request.mask2d.shape[1] == request.length + request.decoded:
            return request.mask2d[:, request.length :].bool()
        return torch.ones(request.batch, request.decoded, dtype=torch.bool, device=request.valid.device)

    # ----- decoder layers ------------------------------------------------------------------------------------
    def on_layer_call(self, index: int, args, kwargs):
        request = self.states.get().request
        if request is None:
            return None
        if request.prefill:
            return self._prefill_layer(request, index, args, kwargs)
        return self._decode_layer(request, index, args, kwargs)

    def _start_prefill(self, request: Request, hidden: torch.Tensor) -> None:
        b, length = request.input_ids.shape
        device = hidden.device
        request.cols = torch.arange(length, device=device).expand(b, -1)
        request.layout_valid = request.valid.to(device)
        request.positions = request.orig_positions.to(device)
        request.next_orig = request.next_orig.to(device)
        items = image_records.collect(self.adapter, self.states.get(), request)
        request.images = image_records.place(request, items, self.adapter.image_token_id, device)
        trace = Trace()
        trace.reset(self.plan.n_layers)
        for img in request.images:
            t = img.tokens
            trace.images[(img.sample, img.image)] = {
                "n_tokens": img.n_tokens, "grid_hw": t.grid_hw, "grid_rc": t.grid_rc.cpu(), "groups": t.groups.cpu(),
            }  # fmt: skip
        request.trace = trace
        self.publish(trace)

    def _move_layout(self, request: Request, device: torch.device) -> None:
        if request.cols.device != device:
            request.cols, request.layout_valid = request.cols.to(device), request.layout_valid.to(device)
            request.positions, request.next_orig = request.positions.to(device), request.next_orig.to(device)

    def _signal_rope(self, request: Request, hidden: torch.Tensor, layer_rope):
        """RoPE for the q/k that methods read: the layer's own, but counted from each sample's first real token.
        A plain forward of a left-padded batch without ``position_ids`` numbers the pads (HF's default), which
        leaves attention unchanged but shifts rotated keys (DART's key norms), so a decision would depend on
        padding. generate() and unpadded prompts start at 0 already and keep the layer's own tensors."""
        pos = request.positions
        if pos.dim() != 2:  # M-RoPE ids come from the model's own mask-aware index
            return layer_rope
        first = pos.masked_fill(~request.layout_valid, torch.iinfo(pos.dtype).max).amin(1, keepdim=True)
        if not bool((first > 0).any()):
            return layer_rope
        return self.adapter.rotary(hidden, (pos - first).clamp(min=0))

    def _own_qk(self, request: Request, index: int, hidden: torch.Tensor, kwargs) -> None:
        segment = request.segment_for(index)
        if segment is not None:
            segment = segment.on(hidden.device)
            if segment.cos_sin is None:
                segment.cos_sin = self.adapter.rotary(hidden, segment.positions)
        cos_sin = kwargs["position_embeddings"] if segment is None else segment.cos_sin  # attention: shift-free
        with torch.no_grad():
            q, k = self.adapter.layer_qk(index, hidden, cos_sin)
        request.own_qk[index] = {
            "cols": request.cols, "valid": request.layout_valid, "hidden": hidden.detach(), "q": q, "k": k,
        }  # fmt: skip

    def _prefill_layer(self, request: Request, index: int, args, kwargs):
        hidden = original = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            self._start_prefill(request, hidden)
            if self.plan.pre_llm:
                hidden = run_pre_llm(self.adapter, self.plan, request, hidden)
        self._move_layout(request, hidden.device)
        if index in self.plan.own_qk_layers:
            self._own_qk(request, index, hidden, kwargs)
        if index in self.plan.llm_stages:
            hidden = run_llm_stage(self.adapter, self.plan, request, index, hidden)
        segment = request.segment_for(index)
        if segment is not None:
            segment = segment.on(hidden.device)
            if segment.cos_sin is None:
                segment.cos_sin = self.adapter.rotary(hidden, segment.positions)
        if index in self.plan.capture_plan:
            request.captures[index] = {
                "cols": request.cols, "valid": request.layout_valid, "hidden": hidden.detach(),
                "cos_sin": self._signal_rope(
                    request, hidden, kwargs["position_embeddings"] if segment is None else segment.cos_sin
                ),
            }  # fmt: skip
        if segment is None:
            return None if hidden is original else _with_hidden(args, kwargs, hidden, dict(kwargs))
        new_kwargs = dict(kwargs)
        impl = self.adapter.attn_implementation()
        new_kwargs["attention_mask"] = layout.prefill_mask(segment, kwargs.get("attention_mask"), hidden.dtype, impl)
        new_kwargs["position_embeddings"] = segment.cos_sin
        if new_kwargs.get("position_ids") is not None:
            pos = segment.positions
            new_kwargs["position_ids"] = pos if pos.dim() == 2 else pos[0]
        return _with_hidden(args, kwargs, hidden, new_kwargs)

    def _decode_layer(self, request: Request, index: int, args, kwargs):
        segment = request.segment_for(index)
        if segment is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        segment = segment.on(hidden.device)
        new_valid = self._decode_key_validity(request)
        impl = self.adapter.attn_implementation()
        new_kwargs = dict(kwargs)
        new_kwargs["attention_mask"] = layout.decode_mask(
            segment, new_valid, hidden.shape[1], kwargs.get("attention_mask"), hidden.dtype, impl
        )
        if bool((segment.decode_offset != 0).any()):
            pos = request.decode_positions.to(hidden.device)
            offset = segment.decode_offset
            shifted = pos - (offset[:, None] if pos.dim() == 2 else offset[None, :, None])
            new_kwargs["position_embeddings"] = self.adapter.rotary(hidden, shifted)
        return args, new_kwargs
