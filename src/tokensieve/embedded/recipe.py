"""The v2 recipe's hyperparameters (:class:`V2Config`) and its stages, in training order."""

from __future__ import annotations

from dataclasses import dataclass

from tokensieve.embedded.synthetic import check_family_weights

STAGES = ("clip", "dense", "align", "instruct")


@dataclass
class V2Config:
    """Hyperparameters of the v2 recipe (about 60 minutes on 2 idle cores; issue 11 allows 2.5 hours)."""

    seed: int = 0
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 12
    heads: int = 4
    clip_steps: int = 900
    clip_batch: int = 48
    clip_lr: float = 1e-3
    dense_weight: float = 1.0  # the dense per-patch loss beside the contrastive one (embedded.dense)
    dense_steps: int = 1200  # then the dense objective alone, at a higher rate (the contrastive loss slows it)
    dense_batch: int = 48
    dense_lr: float = 2e-3
    align_steps: int = 500
    align_batch: int = 16
    align_lr: float = 1e-3
    instruct_steps: int = 4800
    instruct_batch: int = 16
    instruct_lr: float = 8e-4
    caption_fraction: float = 0.1  # instruction batches that are captioning batches, so alignment is kept
    instruct_pointer_weight: float = 1.0  # training-only attention pointers (embedded.pointers); 0 turns off
    instruct_pointer_layer: int = 2  # the object pointer's layer; the word pointer is the layer before
    instruct_pointer_heads: int = 2
    instruct_sink_weight: float = 1.0  # the start token's pointer share against one object's (BatchBuilder)
    instruct_count_weight: float = 3.0  # the counting family's weight as a scene's primary question (others 1)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    multi_image_fraction: float = 0.08
    eval_every: int = 300
    eval_per_family: int = 20

    def __post_init__(self) -> None:
        if self.instruct_pointer_weight > 0 and not 1 <= self.instruct_pointer_layer < self.text_layers:
            raise ValueError(
                f"instruct_pointer_layer must be in 1..{self.text_layers - 1} (the word pointer is the layer "
                f"before it), got {self.instruct_pointer_layer}; pass --instruct-pointer-weight 0 to turn them off"
            )
        if self.family_weights is not None:
            check_family_weights(self.family_weights)  # before any stage runs, not at the first instruction batch

    @property
    def family_weights(self) -> dict[str, float] | None:
        """Instruction tuning's primary-question mix; None keeps the unweighted draw (the stream of weight 1)."""
        return None if self.instruct_count_weight == 1.0 else {"count": self.instruct_count_weight}
