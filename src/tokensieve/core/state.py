"""Request and segment state: one prefill and the decoding that follows it, kept per thread.

A *segment* is the layout seen by the decoder layers from ``start`` on (until the next segment): which original
prompt columns its rows hold (left-padded per sample), their validity, and the positions those layers use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..adapters.base import FeatureRecord, ImageTokens
from ..trace import Trace


@dataclass
class Segment:
    """The layout seen by decoder layers from ``start`` on."""

    start: int
    cols: torch.Tensor  # [B, Lc] original prompt column of each row (left-padded per sample)
    valid: torch.Tensor  # [B, Lc] bool
    positions: torch.Tensor  # [B, Lc] or [3, B, Lc] position ids used by these layers
    decode_offset: torch.Tensor  # [B] subtract from the original decode positions
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    _moved: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> Segment:
        """This segment with its tensors on ``device`` (a ``device_map`` may put later layers elsewhere)."""
        if self.cols.device == device:
            return self
        if device not in self._moved:
            cos_sin = None if self.cos_sin is None else tuple(t.to(device) for t in self.cos_sin)
            self._moved[device] = Segment(
                self.start,
                self.cols.to(device),
                self.valid.to(device),
                self.positions.to(device),
                self.decode_offset.to(device),
                cos_sin,
            )
        return self._moved[device]


@dataclass
class PlacedImage:
    """One image of one request: its tokens (shared by every row that shows it) and where it sits."""

    tokens: ImageTokens
    record: FeatureRecord
    key: int  # content key: hash of the image's pixels (or features), see core.images
    sample: int
    image: int  # index among the sample's images
    positions: torch.Tensor  # [n] prompt columns of its placeholders

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.features.shape[0])


@dataclass
class Request:
    """State of one prefill and the decoding that follows it."""

    input_ids: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool (attention mask of the prompt)
    images: list[PlacedImage] = field(default_factory=list)
    encoded_from: int | None = None  # index into the thread's records where this forward's own encoding starts
    encoded: object = None  # generate's pre-encoded image output (mm_encoder_outputs["image"]), if any
    trace: Trace | None = None
    orig_positions: torch.Tensor | None = None  # [B, L] or [3, B, L]
    segments: list[Segment] = field(default_factory=list)
    cols: torch.Tensor | None = None  # current layout during prefill
    layout_valid: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    next_orig: torch.Tensor | None = None  # [B] first decode position in original coordinates
    mask2d: torch.Tensor | None = None  # [B, L + decoded] 2-D mask seen at the current call
    decode_positions: torch.Tensor | None = None  # [B, q] or [3, B, q] original positions of this decode call
    prefill: bool = True
    decoded: int = 0  # tokens fed after the prompt so far (including the current call)
    captures: dict[int, dict[str, object]] = field(default_factory=dict)  # layer -> raw batch signals
    own_qk: dict[int, dict[str, object]] = field(default_factory=dict)  # layer K -> its own q/k (before K prunes)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def segment_for(self, index: int) -> Segment | None:
        found = None
        for segment in self.segments:
            if segment.start <= index:
                found = segment
        return found


@dataclass
class ThreadState:
    """What one thread's calls into the sieved model have in flight."""

    request: Request | None = None
    records: list[FeatureRecord] = field(default_factory=list)  # image encodings seen in this scope
    recording: FeatureRecord | None = None  # the get_image_features call in progress
    generate_depth: int = 0  # > 0 inside generate(): records live until it returns

    def clear(self) -> None:
        self.request = None
        self.records.clear()
        self.recording = None


class States:
    """One :class:`ThreadState` per thread (``threading.local``), so that threads sharing a sieved model never see
    each other's requests; a dead thread's state goes with it, and :meth:`clear` drops every thread's state."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> ThreadState:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = ThreadState()
        return state

    def clear(self) -> None:
        state = getattr(self._local, "state", None)
        if state is not None:
            state.clear()
        self._local = threading.local()  # other threads' states are released with the old local
