"""The sieve: a context manager that prunes visual tokens of a HuggingFace VLM while it is active.

How it works (one prefill, then decoding):

1. ``get_image_features`` is wrapped to record the per-image visual features (and, on demand, the projector
   input and vision-tower q/k) as they are computed, by ``forward`` or by ``generate``'s pre-encoding.
2. A pre-hook on the multimodal model reads ``input_ids`` to find the ``<image>`` placeholders of each image.
3. Pre-hooks on the decoder layers apply the decisions: at layer 0 for pre-LLM stages (``vision``,
   ``projector``), at layer K for ``llm`` stages. From a pruning layer on, the layer sees a compacted sequence
   (left-padded per sample), an attention mask built for it, and rotary embeddings for the stage's position
   policy. The KV cache of those layers therefore holds only the kept tokens.
4. During decoding the same hooks give each pruned layer a mask over its own (shorter) cache and, under the
   ``reindex`` policy, positions shifted by what was pruned.
5. The decoder output is scattered back to the prompt's original length, so logits line up with ``input_ids``
   (pruned positions get zero hidden states) and ``generate`` works unchanged.

Every hook and patched attribute is removed in ``__exit__``, also after an exception.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters.base import Adapter, FeatureRecord, ImageTokens, UnsupportedModelError, get_adapter
from .budget import Keep, resolve_keep
from .context import ImageContext, LayerCapture, LLMContext, Selection, VisionSignals
from .methods.base import Method, MethodError, make_method
from .trace import StageRecord, Trace

PRE_LLM_STAGES = ("vision", "projector")


class NoImageTokensWarning(UserWarning):
    """A prompt reached the model without ``<image>`` placeholders: it runs unpruned."""


@dataclass
class _Segment:
    """The layout seen by decoder layers from ``start`` on (until the next segment)."""

    start: int
    cols: torch.Tensor  # [B, Lc] original prompt column of each row (left-padded per sample)
    valid: torch.Tensor  # [B, Lc] bool
    positions: torch.Tensor  # [B, Lc] or [3, B, Lc] position ids used by these layers
    decode_offset: torch.Tensor  # [B] subtract from the original decode positions
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class _Request:
    """State of one prefill and the decoding that follows it."""

    input_ids: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool (attention mask of the prompt)
    images: list[ImageTokens] = field(default_factory=list)
    orig_positions: torch.Tensor | None = None  # [B, L] or [3, B, L]
    segments: list[_Segment] = field(default_factory=list)
    cols: torch.Tensor | None = None  # current layout during prefill
    layout_valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    next_orig: torch.Tensor | None = None  # [B] first decode position in original coordinates
    mask2d: torch.Tensor | None = None  # [B, L + decoded] 2-D mask seen at the current call
    decode_positions: torch.Tensor | None = None  # [B, q] or [3, B, q] original positions of this decode call
    prefill: bool = True
    decoded: int = 0  # tokens fed after the prompt so far (including the current call)
    captures: dict[int, dict[str, object]] = field(default_factory=dict)  # layer -> raw batch signals

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def _resolve_methods(method, keep, kwargs) -> list[Method]:
    if isinstance(method, (list, tuple)):
        if kwargs:
            raise MethodError("with a list of methods, pass hyperparameters on each method object, not as kwargs")
        out = []
        for m in method:
            out.append(make_method(m, keep=keep) if isinstance(m, str) and keep is not None else make_method(m))
        if not out:
            raise MethodError("the list of methods is empty")
        return out
    if isinstance(method, Method):
        if keep is not None:
            raise MethodError("keep was passed next to a method object; set keep on the object instead")
        return [make_method(method, **kwargs)]
    if keep is not None:
        kwargs = {**kwargs, "keep": keep}
    return [make_method(method, **kwargs)]


class Sieve:
    """Prune the visual tokens of ``model`` while the ``with`` block is active.

    Parameters
    ----------
    model : a supported ``*ForConditionalGeneration`` VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).
    method : registry name, a method object, or a list of method objects (one per stage, composed in order).
    keep : tokens per image (int) or fraction of each image's tokens (float in (0, 1]).
    **method_kwargs : hyperparameters of the method when ``method`` is a name.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method | Sequence[str | Method] = "random",
        keep: Keep | None = None,
        **method_kwargs,
    ):
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.methods = _resolve_methods(method, keep, method_kwargs)
        self.trace = Trace()
        self._handles: list = []
        self._patched: list[tuple[object, str, object]] = []
        self._pending: list[FeatureRecord] = []
        self._recording: FeatureRecord | None = None
        self._request: _Request | None = None
        self._warned_no_image = False
        self._plan()

    # ----- planning (all validation happens here, before any forward pass) -----------------------------------
    def _plan(self) -> None:
        n_layers = self.adapter.n_layers
        rank = {"vision": 0, "projector": 1, "llm": 2}
        self.pre_llm = [m for m in self.methods if m.stage in PRE_LLM_STAGES]
        self.llm_stages: dict[int, list[Method]] = {}
        last = (-1, -1)
        for m in self.methods:
            layers = m.llm_layers(n_layers) if m.stage == "llm" else [0]
            key = (rank[m.stage], layers[0])
            if key < last:
                raise MethodError(
                    f"methods must be listed in pipeline order (vision, projector, then llm by layer); "
                    f"{m.name} comes after a later stage"
                )
            last = key
            if m.stage == "llm":
                for layer in layers:
                    if layer == 0 and "attention" in m.needs:
                        raise MethodError(f"{m.name} reads attention of layer K-1, so it needs layer >= 1")
                    self.llm_stages.setdefault(layer, []).append(m)
        fixed = self.adapter.fixed_tokens_per_image()
        for m in self.methods:
            if fixed is not None and isinstance(m.keep, int):
                resolve_keep(m.keep, fixed)  # raises BudgetError before any forward pass
        needs = set().union(*(m.needs for m in self.methods))
        if "vision_qk" in needs or "vision_hidden" in needs:
            if not self.adapter.supports_vision_qk:
                users = [m.name for m in self.methods if {"vision_qk", "vision_hidden"} & set(m.needs)]
                raise UnsupportedModelError(
                    f"{', '.join(users)} read(s) vision-tower attention, which the {self.adapter.family} adapter "
                    f"cannot capture yet; use a projector-stage method (e.g. divprune, zoo) on this family."
                )
        cls_readers = [m.name for m in self.methods if getattr(m, "requires_cls", False)]
        if cls_readers and not self.adapter.vision_layout()[0]:
            raise UnsupportedModelError(
                f"{', '.join(cls_readers)} score(s) tokens by [CLS] attention and the {self.adapter.family} vision "
                f"tower has no [CLS] token; use a built-in vision method (visionzip, hiprune, flowcut, tcc: they "
                f"have a CLS-free path) or a projector-stage "
                f"method (e.g. divprune, zoo) on this family."
            )
        self.needs = needs
        n_vision = len(self.adapter.vision_attention_layers())
        wanted = {
            layer if layer >= 0 else n_vision + layer for m in self.methods for layer in m.vision_layers(n_vision)
        }
        if any(m.stage == "vision" and {"vision_qk", "vision_hidden"} & set(m.needs) for m in self.methods):
            wanted.add(self.adapter.vision_feature_layer_index())  # the default layer of every vision method
        self.vision_layers = sorted(wanted)

        # Decoder layers whose signals some llm stage reads: layer -> set of signals.
        self.capture_plan: dict[int, set[str]] = {}
        for layer, stage_methods in self.llm_stages.items():
            for m in stage_methods:
                wanted = {"attention", "layer_hidden", "sublayer_io"} & set(m.needs)
                if not wanted:
                    continue
                for j in m.capture_layers(layer, n_layers):
                    if not 0 <= j < layer:
                        raise MethodError(
                            f"{m.name} at layer {layer} asks for signals of layer {j}; use 0 <= j < {layer}"
                        )
                    self.capture_plan.setdefault(j, set()).update(wanted)

    # ----- context manager -------------------------------------------------------------------------------------
    def __enter__(self) -> Sieve:
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for obj, name, original in reversed(self._patched):
            if original is None:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, original)
        self._patched.clear()
        self._pending.clear()
        self._request = None

    def _install(self) -> None:
        base = self.adapter.base
        original = base.__dict__.get("get_image_features")
        bound = base.get_image_features

        @functools.wraps(bound)  # generate() inspects the signature to route pixel_values
        def get_image_features(*args, **kwargs):
            record = FeatureRecord(features=[], call_kwargs=dict(kwargs))
            if args:
                record.call_kwargs.setdefault("pixel_values", args[0])
                if len(args) > 1:
                    second = "image_grid_thw" if self.adapter.family == "qwen2_vl" else "image_sizes"
                    record.call_kwargs.setdefault(second, args[1])
            self._recording = record
            try:
                output = bound(*args, **kwargs)
            finally:
                self._recording = None
            record.features = self.adapter.image_features_output(output)
            self._pending.append(record)
            return output

        base.get_image_features = get_image_features
        self._patched.append((base, "get_image_features", original))

        if self.pre_llm and {"pre_features", "projector"} & self.needs:
            if self.adapter.family == "qwen2_vl":
                self._handles.append(self.adapter.visual.register_forward_hook(self._capture_vision_output))
            else:
                self._handles.append(
                    self.adapter.projector_module().register_forward_hook(self._capture_projector_input)
                )
        if self.vision_layers:
            self._install_vision_capture()

        self._handles.append(base.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        text = self.adapter.text_model
        self._handles.append(text.register_forward_pre_hook(self._on_text_call, with_kwargs=True))
        self._handles.append(text.register_forward_hook(self._on_text_output))
        for i, layer in enumerate(self.adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        for i, signals in self.capture_plan.items():
            modules: dict[str, nn.Module] = {}
            if "attention" in signals:
                q_proj, k_proj, *_ = self.adapter.qk_projections(i)
                modules.update(q=q_proj, k=k_proj)
            if "sublayer_io" in signals:
                modules.update(self.adapter.sublayers(i))
            for name, module in modules.items():
                self._handles.append(module.register_forward_hook(self._make_capture_hook(i, name)))

    # ----- capture hooks -----------------------------------------------------------------------------------------
    def _capture_projector_input(self, module, args, output) -> None:
        if self._recording is not None:
            self._recording.projector_input = args[0].detach()

    def _capture_vision_output(self, module, args, output) -> None:
        if self._recording is not None:
            self._recording.vision_output = output

    def _install_vision_capture(self) -> None:
        self._handles.extend(self.adapter.install_vision_capture(self.vision_layers, lambda: self._recording))

    def _make_capture_hook(self, layer: int, name: str):
        def hook(module, args, output):
            request = self._request
            if request is not None and request.prefill:
                value = output[0] if isinstance(output, tuple) else output
                request.captures.setdefault(layer, {})[name] = value.detach()

        return hook

    # ----- model-level hooks -------------------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self._request = None
            if input_ids is None:
                if self.methods:
                    warnings.warn(
                        "tokensieve: the model was called with inputs_embeds instead of input_ids, so the "
                        "<image> placeholders cannot be located; this call runs unpruned.",
                        NoImageTokensWarning,
                        stacklevel=2,
                    )
                self._pending.clear()
                return None
            is_image = input_ids == self.adapter.image_token_id
            if not bool(is_image.any()):
                if not self._warned_no_image:
                    warnings.warn(
                        "tokensieve: the prompt has no image tokens; it runs unpruned. Put the processor's image "
                        "placeholder (e.g. '<image>') in the text to prune its visual tokens.",
                        NoImageTokensWarning,
                        stacklevel=2,
                    )
                    self._warned_no_image = True
                self._pending.clear()
                return None
            mask = kwargs.get("attention_mask")
            valid = (
                torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask[:, -input_ids.shape[1] :].bool()
            )
            self._request = _Request(input_ids=input_ids, valid=valid)
        elif self._request is not None:
            self._request.prefill = False
        return None

    def _on_text_call(self, module, args, kwargs):
        request = self._request
        if request is None:
            return None
        mask = kwargs.get("attention_mask")
        request.mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]  # Qwen prepends text positions for packed masks
        if request.prefill:
            if position_ids is None:  # the decoder's own default: arange over the prompt, pads included
                position_ids = torch.arange(request.length, device=request.valid.device).expand(request.batch, -1)
            elif position_ids.dim() == 2 and position_ids.shape[0] != request.batch:
                position_ids = position_ids.expand(request.batch, -1)
            request.orig_positions = position_ids
            flat = position_ids if position_ids.dim() == 2 else position_ids.amax(0)
            request.next_orig = flat.masked_fill(~request.valid, -1).amax(-1) + 1
            return None
        # Decoding.
        q_len = self._query_length(args, kwargs)
        done = request.decoded
        request.decoded += q_len
        if position_ids is None:
            position_ids = request.next_orig[:, None] + done + torch.arange(q_len, device=request.next_orig.device)
        request.decode_positions = position_ids
        first = request.segments[0] if request.segments else None
        if first is not None and first.start == 0:
            # Layer 0 caches only the kept tokens: give the decoder a 2-D mask of the same length, so its own
            # mask bookkeeping agrees with the cache (the pruned layers get their own masks anyway).
            new = self._decode_key_validity(request)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = torch.cat([first.valid, new], dim=1).long()
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = position_ids
            return args, kwargs
        return None

    def _on_text_output(self, module, args, output):
        request = self._request
        if request is None or not request.prefill or not request.segments:
            return None
        hidden = output[0]
        full = hidden.new_zeros(request.batch, request.length, hidden.shape[-1])
        index = request.cols[..., None].expand(-1, -1, hidden.shape[-1])
        full.scatter_(1, index, hidden)
        output.last_hidden_state = full
        return output

    @staticmethod
    def _query_length(args, kwargs) -> int:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            return embeds.shape[1]
        ids = kwargs.get("input_ids", args[0] if args else None)
        return ids.shape[1]

    @staticmethod
    def _decode_key_validity(request: _Request) -> torch.Tensor:
        """Validity [B, n_new] of the keys generated after the prompt (this call's tokens included)."""
        if request.mask2d is not None and request.mask2d.shape[1] == request.length + request.decoded:
            return request.mask2d[:, request.length :].bool()
        return torch.ones(request.batch, request.decoded, dtype=torch.bool, device=request.valid.device)

    # ----- decoder-layer hook ------------------------------------------------------------------------------------
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            request = self._request
            if request is None:
                return None
            if request.prefill:
                return self._prefill_layer(index, args, kwargs)
            return self._decode_layer(index, args, kwargs)

        return hook

    def _prefill_layer(self, index: int, args, kwargs):
        request = self._request
        hidden = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            self._start_prefill(request, hidden)
            if self.pre_llm:
                hidden = self._run_pre_llm(request, hidden)
        if index in self.llm_stages:
            hidden = self._run_llm_stage(request, index, hidden)
        segment = self._segment_for(request, index)
        if index in self.capture_plan:
            request.captures[index] = {
                "cols": request.cols,
                "valid": request.layout_valid,
                "hidden": hidden.detach(),
                "cos_sin": kwargs["position_embeddings"] if segment is None else None,
            }
        if segment is None:
            return None
        if segment.cos_sin is None:
            segment.cos_sin = self.adapter.rotary(hidden, segment.positions)
        mask = self._prefill_mask(segment, kwargs.get("attention_mask"), hidden.dtype)
        new_kwargs = dict(kwargs)
        new_kwargs["attention_mask"] = mask
        new_kwargs["position_embeddings"] = segment.cos_sin
        if "position_ids" in new_kwargs and new_kwargs["position_ids"] is not None:
            pos = segment.positions
            new_kwargs["position_ids"] = pos if pos.dim() == 2 else pos[0]
        if index in self.capture_plan:
            request.captures[index]["cos_sin"] = segment.cos_sin
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _decode_layer(self, index: int, args, kwargs):
        request = self._request
        segment = self._segment_for(request, index)
        if segment is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[1]
        new_valid = self._decode_key_validity(request)
        n_new = new_valid.shape[1]
        keys_valid = torch.cat([segment.valid, new_valid], dim=1)  # [B, Lc + n_new]
        # Query j (the (n_new - q_len + j)-th generated token) sees the kept prompt and earlier generated keys.
        lc = segment.valid.shape[1]
        key_order = torch.arange(lc + n_new, device=hidden.device)
        query_order = lc + n_new - q_len + torch.arange(q_len, device=hidden.device)
        allowed = (key_order[None, :] <= query_order[:, None])[None] & keys_valid[:, None, :]
        new_kwargs = dict(kwargs)
        new_kwargs["attention_mask"] = self._format_mask(
            allowed, keys_valid, kwargs.get("attention_mask"), hidden.dtype
        )
        if bool((segment.decode_offset != 0).any()):
            pos = request.decode_positions
            offset = segment.decode_offset
            shifted = pos - (offset[:, None] if pos.dim() == 2 else offset[None, :, None])
            new_kwargs["position_embeddings"] = self.adapter.rotary(hidden, shifted)
        return args, new_kwargs

    @staticmethod
    def _segment_for(request: _Request, index: int) -> _Segment | None:
        found = None
        for segment in request.segments:
            if segment.start <= index:
                found = segment
        return found

    # ----- masks -------------------------------------------------------------------------------------------------
    def _prefill_mask(self, segment: _Segment, original, dtype):
        cols, valid = segment.cols, segment.valid
        allowed = (cols[:, None, :] <= cols[:, :, None]) & valid[:, None, :]  # [B, q, k]
        return self._format_mask(allowed, valid, original, dtype)

    def _format_mask(self, allowed: torch.Tensor, key_valid: torch.Tensor, original, dtype):
        impl = self.adapter.attn_implementation()
        if "flash" in impl:
            return None if bool(key_valid.all()) else key_valid.long()
        # A padding query would see no key at all; let it see everything so softmax stays finite.
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | empty
        allowed = allowed[:, None]  # [B, 1, q, k]
        if isinstance(original, dict):
            original = next(iter(original.values()), None)
        if (isinstance(original, torch.Tensor) and original.is_floating_point()) or impl == "eager":
            min_value = torch.finfo(dtype).min
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, min_value)
        return allowed

    # ----- applying decisions ------------------------------------------------------------------------------------
    def _start_prefill(self, request: _Request, hidden: torch.Tensor) -> None:
        b, length = request.input_ids.shape
        device = hidden.device
        request.cols = torch.arange(length, device=device).expand(b, -1)
        request.layout_valid = request.valid.to(device)
        request.positions = request.orig_positions.to(device)
        request.segments = []
        self.trace.reset(self.adapter.n_layers)
        is_image = request.input_ids == self.adapter.image_token_id
        total = int(is_image.sum())
        # The most recent get_image_features calls that cover every placeholder (older ones are stale).
        records, count = [], 0
        for record in reversed(self._pending):
            if count >= total:
                break
            records.insert(0, record)
            count += sum(int(f.shape[0]) for f in record.features)
        self._pending = []
        images: list[ImageTokens] = []
        for record in records:
            for image in self.adapter.image_tokens(record):
                image.record = record
                images.append(image)
        if sum(int(img.features.shape[0]) for img in images) != total:
            raise RuntimeError(
                f"tokensieve: {total} <image> placeholders but {sum(i.features.shape[0] for i in images)} visual "
                f"features were computed under the sieve; pass pixel_values (not precomputed features) so the "
                f"sieve sees the images"
            )
        rows, cols = is_image.nonzero(as_tuple=True)
        offset = 0
        per_sample: dict[int, int] = {}
        for img in images:
            n = img.features.shape[0]
            sample_rows = rows[offset : offset + n]
            if not bool((sample_rows == sample_rows[0]).all()):
                raise RuntimeError("tokensieve: an image's placeholders span two samples; check the prompt batch")
            img.sample = int(sample_rows[0])
            img.image = per_sample.get(img.sample, 0)
            per_sample[img.sample] = img.image + 1
            img.positions = cols[offset : offset + n].to(device)
            offset += n
            self.trace.images[(img.sample, img.image)] = {
                "n_tokens": n,
                "grid_hw": img.grid_hw,
                "grid_rc": img.grid_rc.cpu(),
                "groups": img.groups.cpu(),
            }
        request.images = images

    def _image_context(self, request: _Request, img: ImageTokens, cand: torch.Tensor, features: torch.Tensor):
        text_ids = text_embeds = text_segment = None
        if "text" in self.needs:
            b = img.sample
            mask = request.valid[b] & (request.input_ids[b] != self.adapter.image_token_id)
            text_ids = request.input_ids[b][mask]
            text_embeds = self.adapter.embed_tokens()(text_ids)
            starts = torch.stack([other.positions[0] for other in request.images if other.sample == b])
            text_cols = torch.nonzero(mask).flatten()
            text_segment = (text_cols[:, None] > starts[None, :]).sum(1) - 1
        vision = None
        if self.vision_layers:
            record = img.record
            has_cls, merge_size = self.adapter.vision_layout()
            feature_layer = self.adapter.vision_feature_layer_index()
            vision = VisionSignals(
                has_cls=has_cls,
                merge_size=merge_size,
                n_layers=len(self.adapter.vision_attention_layers()),
                feature_layer=feature_layer,
            )
            for layer, qkv in record.vision_qk.items():
                for name, store in (("q", vision.queries), ("k", vision.keys), ("v", vision.values)):
                    if name in qkv:
                        store[layer] = [qkv[name][c].transpose(0, 1) for c in img.crops]
            for layer, hid in record.vision_hidden.items():
                vision.hidden[layer] = [hid[c] for c in img.crops]
        return ImageContext(
            sample=img.sample,
            image=img.image,
            n_tokens=int(img.features.shape[0]),
            token_index=cand,
            features=features,
            grid_rc=img.grid_rc[cand],
            grid_hw=img.grid_hw,
            groups=img.groups[cand],
            always_keep=img.always_keep[cand],
            pre_features=None if img.pre_features is None else img.pre_features[cand],
            project=self.adapter.project_fn() if "projector" in self.needs else None,
            projector_module=self.adapter.projector_module() if "projector" in self.needs else None,
            text_ids=text_ids,
            text_embeds=text_embeds,
            text_segment=text_segment,
            embed_tokens=self.adapter.embed_tokens() if "text" in self.needs else None,
            vision=vision,
            vision_patch_index=None if img.vision_patch_index is None else img.vision_patch_index[cand],
            family=self.adapter.family,
        )

    def _run_pre_llm(self, request: _Request, hidden: torch.Tensor) -> torch.Tensor:
        keep_rows = request.layout_valid.clone()  # current layout == original at layer 0
        hidden = hidden.clone()  # merged tokens may be written into it
        for method in self.pre_llm:
            record = StageRecord(name=method.name, layer=0)
            for img in request.images:
                cand = torch.nonzero(keep_rows[img.sample, img.positions]).flatten()
                features = hidden[img.sample, img.positions[cand]]
                k = method.budget(int(img.features.shape[0]), n_layers=self.adapter.n_layers)
                if k < cand.numel():
                    ctx = self._image_context(request, img, cand, features)
                    result = self._select(method, ctx, k)
                    chosen, replace_at, replace_with = self._check_selection(method, result, cand.numel(), k)
                    if replace_at is not None:
                        hidden[img.sample, img.positions[cand[replace_at]]] = replace_with.to(hidden.dtype)
                    drop = torch.ones(cand.numel(), dtype=torch.bool, device=cand.device)
                    drop[chosen] = False
                    keep_rows[img.sample, img.positions[cand[drop]]] = False
                    cand = cand[chosen]
                record.kept[(img.sample, img.image)] = cand.cpu()
                record.n_tokens[(img.sample, img.image)] = int(img.features.shape[0])
            self.trace.stages.append(record)
        return self._compact(request, 0, keep_rows, self._policy(self.pre_llm[-1]), hidden)

    def _run_llm_stage(self, request: _Request, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        keep_rows = request.layout_valid.clone()
        n_layers = self.adapter.n_layers
        for method in self.llm_stages[layer]:
            stage_index = method.llm_layers(n_layers).index(layer)
            record = StageRecord(name=method.name, layer=layer)
            wanted = {"attention", "layer_hidden", "sublayer_io"} & set(method.needs)
            batch_captures = {
                j: self._batch_capture(request, j, "attention" in method.needs)
                for j in (method.capture_layers(layer, n_layers) if wanted else [])
            }
            for img in request.images:
                b = img.sample
                rows_of_image = self._rows_of(request, b, img.positions)  # [n] rows in the layout, -1 if gone
                present = (rows_of_image >= 0) & keep_rows[b, rows_of_image.clamp(min=0)]
                cand = torch.nonzero(present).flatten()
                rows = rows_of_image[cand]
                k = method.budget(int(img.features.shape[0]), stage_index=stage_index, n_layers=n_layers)
                if k < cand.numel():
                    text_rows = self._text_rows(request, b)
                    text_cols = request.cols[b, text_rows]
                    ctx = LLMContext(
                        sample=b,
                        image=img.image,
                        layer=layer,
                        n_layers=n_layers,
                        n_tokens=int(img.features.shape[0]),
                        token_index=cand,
                        hidden=hidden[b, rows],
                        text_hidden=hidden[b, text_rows],
                        image_cols=img.positions[cand],
                        text_cols=text_cols,
                        text_after_image=text_cols > img.positions.max(),
                        last_col=int(request.cols[b][request.layout_valid[b]].max()),
                        layers={j: self._sample_capture(cap, b) for j, cap in batch_captures.items()},
                        stage_index=stage_index,
                        norm=getattr(self.adapter.text_model, "norm", None),
                                )
                    result = self._select(method, ctx, k)
                    chosen, replace_at, replace_with = self._check_selection(method, result, cand.numel(), k)
                    if replace_at is not None:
                        hidden = hidden.clone()
                        hidden[b, rows[replace_at]] = replace_with.to(hidden.dtype)
                    drop = torch.ones(cand.numel(), dtype=torch.bool, device=cand.device)
                    drop[chosen] = False
                    keep_rows[b, rows[drop]] = False
                    cand = cand[chosen]
                record.kept[(b, img.image)] = cand.cpu()  # cand indexes the image's original tokens
                record.n_tokens[(b, img.image)] = int(img.features.shape[0])
            self.trace.stages.append(record)
        policy = self._policy(self.llm_stages[layer][-1])
        return self._compact(request, layer, keep_rows, policy, hidden)

    def _batch_capture(self, request: _Request, layer: int, rotate: bool) -> dict:
        raw = request.captures.get(layer)
        if raw is None:
            raise RuntimeError(f"tokensieve: signals of decoder layer {layer} were not captured")
        out = dict(raw)
        if rotate:
            _, _, heads, kv_heads, head_dim = self.adapter.qk_projections(layer)
            q, k = raw["q"], raw["k"]
            b, length, _ = q.shape
            q = q.view(b, length, heads, head_dim).transpose(1, 2)
            k = k.view(b, length, kv_heads, head_dim).transpose(1, 2)
            cos, sin = raw["cos_sin"]
            out["q"], out["k"] = self.adapter.rotate_qk(layer, q, k, cos, sin)
        return out

    @staticmethod
    def _sample_capture(cap: dict, b: int) -> LayerCapture:
        def row(name):
            value = cap.get(name)
            return None if value is None else value[b]

        return LayerCapture(
            cols=cap["cols"][b],
            valid=cap["valid"][b],
            queries=row("q"),
            keys=row("k"),
            hidden=row("hidden"),
            attn_in=row("attn_in"),
            attn_out=row("attn_out"),
            mlp_in=row("mlp_in"),
            mlp_out=row("mlp_out"),
        )

    def _policy(self, method: Method) -> str:
        """The method's position policy; on M-RoPE families the default is ``original`` (sliced 3-D ids), as in
        every official Qwen2-VL code path, since contiguous 1-D ranks would discard the image grid."""
        if method.positions is not None:
            return method.positions
        return "original" if self.adapter.mrope else method.default_positions

    @staticmethod
    def _rows_of(request: _Request, b: int, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the current layout that hold the given original columns (-1 where pruned), in order."""
        lookup = torch.full((request.length,), -1, dtype=torch.long, device=positions.device)
        lookup[request.cols[b]] = torch.arange(request.cols.shape[1], device=positions.device)
        rows = lookup[positions]
        valid = request.layout_valid[b, rows.clamp(min=0)] & (rows >= 0)
        return torch.where(valid, rows, torch.full_like(rows, -1))

    def _text_rows(self, request: _Request, b: int) -> torch.Tensor:
        ids = request.input_ids[b, request.cols[b]]
        return torch.nonzero(request.layout_valid[b] & (ids != self.adapter.image_token_id)).flatten()

    @staticmethod
    @torch.no_grad()  # selection is a discrete decision: no autograd graph, in-place ops allowed
    def _select(method: Method, ctx, k: int):
        return method.select(ctx, k)

    @staticmethod
    def _check_selection(method: Method, result, n: int, k: int):
        replace_at = replace_with = None
        if isinstance(result, Selection):
            replace_at, replace_with = result.replace_at, result.replace_with
            result = result.keep
        chosen = torch.as_tensor(result).flatten().long()
        if chosen.numel() == 0:
            if k == 0:  # a budget of zero drops the whole image (ToDRE's late layers)
                return chosen, None, None
        if int(chosen.min()) < 0 or int(chosen.max()) >= n:
            raise RuntimeError(f"tokensieve: {method.name} returned an index outside [0, {n})")
        chosen = torch.unique(chosen)  # sorted: kept tokens stay in their original order
        return chosen, replace_at, replace_with

    def _compact(self, request: _Request, layer: int, keep_rows: torch.Tensor, policy: str, hidden: torch.Tensor):
        """Drop the rows not in ``keep_rows`` from the current layout and open a segment at ``layer``."""
        if bool(torch.equal(keep_rows, request.layout_valid)):
            # Nothing was dropped: the layers keep the model's own mask and positions (bit-exact, no overhead).
            return hidden
        counts = keep_rows.sum(1)
        new_len = int(counts.max())
        order = torch.sort(keep_rows.int(), dim=1, stable=True).indices[:, -new_len:]  # kept rows, left-padded
        cols = request.cols.gather(1, order)
        valid = keep_rows.gather(1, order)
        if request.positions.dim() == 2:
            old_pos = request.positions.gather(1, order)
        else:
            old_pos = request.positions.gather(2, order[None].expand(request.positions.shape[0], -1, -1))
        previous_offset = request.segments[-1].decode_offset if request.segments else torch.zeros_like(counts)
        if policy == "reindex":
            rank = (valid.long().cumsum(1) - 1).clamp(min=0)
            positions = rank if old_pos.dim() == 2 else rank[None].expand(old_pos.shape[0], -1, -1)
            next_new = rank.masked_fill(~valid, -1).amax(1) + 1
            offset = request.next_orig.to(next_new.device) - next_new
        else:
            positions = old_pos
            offset = previous_offset
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        request.cols, request.layout_valid, request.positions = cols, valid, positions
        request.segments.append(
            _Segment(start=layer, cols=cols, valid=valid, positions=positions, decode_offset=offset)
        )
        return hidden


def sieve(
    model: nn.Module,
    method: str | Method | Sequence[str | Method] = "random",
    keep: Keep | None = None,
    **kwargs,
) -> Sieve:
    """Prune visual tokens of ``model`` inside a ``with`` block.

    >>> with tokensieve.sieve(model, "divprune", keep=64) as s:   # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=20)
    >>> s.trace.kept(sample=0, image=0)                             # doctest: +SKIP
    """
    return Sieve(model, method, keep, **kwargs)
