"""Which images a prefill shows, in placeholder order, and the content key of each.

``get_image_features`` is wrapped so that each call leaves a :class:`FeatureRecord`. A forward that gets
``pixel_values`` encodes its images itself (its own new records). A forward that gets generate()'s pre-encoded
output (``mm_encoder_outputs``: once per generate, before beam expansion and before every uncached re-prefill) is
matched to the records tensor by tensor, so an expanded batch row maps back to the image it repeats.

The content key is a hash of the image's pixels (cast to bfloat16, so fp32 and bf16 inputs agree), or of its
features when no pixels are known. Randomised decisions are seeded by it: they depend on the image, never on its
place in the batch; an encoder cache keyed by image content gives the same decision.
"""

from __future__ import annotations

import hashlib

import torch

from ..adapters.base import Adapter, FeatureRecord, ImageTokens
from .state import PlacedImage, Request, ThreadState


def content_key(x: torch.Tensor) -> int:
    """A stable 63-bit hash of a tensor's values (bfloat16) and shape; independent of device and batch."""
    data = x.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    digest = hashlib.blake2b(data + repr(tuple(x.shape)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prepare(adapter: Adapter, record: FeatureRecord) -> None:
    """The record's per-image tokens and content keys, computed once however many rows show them."""
    if record.images is not None:
        return
    record.images = adapter.image_tokens(record)
    pixels = adapter.image_pixels(record)
    sources = pixels if pixels is not None and len(pixels) == len(record.images) else record.features
    record.keys = [content_key(x) for x in sources]


def _match(adapter: Adapter, state: ThreadState, feature: torch.Tensor) -> tuple[ImageTokens, FeatureRecord, int]:
    for exact in (True, False):
        for record in reversed(state.records):
            for i, f in enumerate(record.features):
                same = f is feature or (f.shape == feature.shape and f.data_ptr() == feature.data_ptr())
                if same if exact else f.shape == feature.shape and torch.equal(f, feature.to(f.device)):
                    prepare(adapter, record)
                    return record.images[i], record, record.keys[i]
    raise RuntimeError(
        "tokensieve: the model got pre-encoded image features (mm_encoder_outputs) that were not computed under "
        "this sieve; pass pixel_values (not precomputed features) so that the sieve sees the images"
    )


def collect(adapter: Adapter, state: ThreadState, request: Request) -> list[tuple[ImageTokens, FeatureRecord, int]]:
    """(tokens, record, key) of every image the prefill shows, in placeholder order."""
    if request.encoded is not None:
        return [_match(adapter, state, f) for f in adapter.image_features_output(request.encoded)]
    records = state.records[request.encoded_from or 0 :]
    out = []
    for record in records:
        prepare(adapter, record)
        out.extend(zip(record.images, [record] * len(record.images), record.keys, strict=True))
    return out


def place(request: Request, items: list, image_token_id: int, device: torch.device) -> list[PlacedImage]:
    """Assign each image to its sample and placeholder columns (row-major placeholder order)."""
    is_image = request.input_ids == image_token_id
    total = int(is_image.sum())
    found = sum(int(tokens.features.shape[0]) for tokens, _, _ in items)
    if found != total:
        raise RuntimeError(
            f"tokensieve: {total} <image> placeholders but {found} visual features were computed under the sieve; "
            f"pass pixel_values (not precomputed features) so the sieve sees the images"
        )
    rows, cols = is_image.nonzero(as_tuple=True)
    placed, offset, per_sample = [], 0, {}
    for tokens, record, key in items:
        n = int(tokens.features.shape[0])
        sample_rows = rows[offset : offset + n]
        if not bool((sample_rows == sample_rows[0]).all()):
            raise RuntimeError("tokensieve: an image's placeholders span two samples; check the prompt batch")
        b = int(sample_rows[0])
        index = per_sample.get(b, 0)
        per_sample[b] = index + 1
        placed.append(PlacedImage(tokens, record, key, b, index, cols[offset : offset + n].to(device)))
        offset += n
    return placed
