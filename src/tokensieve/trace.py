"""What a sieve kept: per sample, per image, per stage, as indices into the image's original token grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageRecord:
    """One stage of one prefill: the method, the decoder layer it applies from, and what each image kept."""

    name: str
    layer: int
    kept: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (sample, image) -> LongTensor
    n_tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # (sample, image) -> tokens before pruning


@dataclass
class Trace:
    """Records of the last prefill run under a sieve (earlier prefills are replaced).

    ``kept(sample, image)`` returns the indices that survived every stage, ``kept(sample, image, stage=i)`` those
    after stage ``i``. Indices point into the image's original visual-token order (the order of the ``<image>``
    placeholders in the prompt), so ``0..n-1`` for an image of ``n`` tokens.
    """

    stages: list[StageRecord] = field(default_factory=list)
    images: dict[tuple[int, int], dict] = field(default_factory=dict)  # (sample, image) -> layout info
    n_layers: int = 0

    def reset(self, n_layers: int) -> None:
        self.stages = []
        self.images = {}
        self.n_layers = n_layers

    def kept(self, sample: int = 0, image: int = 0, stage: int = -1) -> torch.Tensor:
        if not self.stages:
            if (sample, image) in self.images:
                return torch.arange(self.images[(sample, image)]["n_tokens"])
            raise KeyError("nothing was recorded: run a forward pass or generate() inside the sieve first")
        key = (sample, image)
        if key not in self.stages[stage].kept:
            raise KeyError(f"no image {image} in sample {sample}; recorded: {sorted(self.stages[stage].kept)}")
        return self.stages[stage].kept[key]

    def num_images(self) -> int:
        return len(self.images)

    def counts_per_layer(self, sample: int = 0, image: int = 0) -> list[int]:
        """Visual tokens of one image seen by each decoder layer (the real count, whatever the budget rule)."""
        n = self.images[(sample, image)]["n_tokens"]
        counts = [n] * self.n_layers
        for record in self.stages:
            count = int(record.kept[(sample, image)].numel())
            for layer in range(record.layer, self.n_layers):
                counts[layer] = count
        return counts

    def layer_average(self, sample: int = 0, image: int = 0) -> float:
        counts = self.counts_per_layer(sample, image)
        return sum(counts) / max(1, len(counts))

    def summary(self) -> str:
        lines = []
        for i, record in enumerate(self.stages):
            sizes = sorted({int(v.numel()) for v in record.kept.values()})
            lines.append(f"stage {i}: {record.name} from layer {record.layer}, kept per image: {sizes}")
        return "\n".join(lines) or "no pruning recorded"
