"""Tiny random-weight models of the real architectures, with processors built offline.

Used by the tests and the overhead benchmarks; also handy to try tokensieve without downloading anything.
Nothing here downloads: tokenizers are word-level and built in memory, image processors are the PIL ones
(torchvision is not needed).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

WORDS = [
    "<pad>", "<unk>", "<s>", "</s>", "<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
    "USER:", "ASSISTANT:", "what", "is", "the", "color", "of", "square", "circle", "red", "blue", "green",
    "yes", "no", "how", "many", "?", "a", "an", "and", "in", "picture", "describe", "this", "image", "left",
    "right", "top", "bottom", "one", "two", "three", "four", "zero",
]  # fmt: skip


def tiny_tokenizer(extra_special: list[str] | None = None):
    """A word-level fast tokenizer over :data:`WORDS` (whitespace split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    special = extra_special or ["<image>"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=special,
    )


def _text_kwargs(
    vocab: int, layers: int, hidden: int = 64, heads: int = 4, mlp_ratio: float = 2.0, kv_heads: int | None = None
) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(mlp_ratio * hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def tiny_llava(
    layers: int = 4,
    image_size: int = 56,
    patch: int = 14,
    attn: str = "sdpa",
    seed: int = 0,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 4,
    vision_mlp_ratio: float = 2.0,
    text_hidden: int = 64,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    mlp_ratio: float = 2.0,
):
    """``LlavaForConditionalGeneration`` (CLIP + GELU projector + Llama) and its processor; 16 tokens/image.

    The defaults are tiny (tests); the size arguments build the mid-size LLaVA-shaped models of the benchmark
    scripts (e.g. ``image_size=336, vision_hidden=1024, text_hidden=1024``: 576 tokens per image)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = tiny_tokenizer()
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden, intermediate_size=int(vision_mlp_ratio * vision_hidden),
            num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            image_size=image_size, patch_size=patch,
        ),
        text_config=LlamaConfig(**_text_kwargs(len(tok), layers, text_hidden, text_heads, mlp_ratio, text_kv_heads)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    proc = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    return model, proc


def tiny_llava_next(layers: int = 4, image_size: int = 28, patch: int = 14, attn: str = "sdpa", seed: int = 0):
    """``LlavaNextForConditionalGeneration`` with anyres pinpoints and newline tokens, and its processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer()
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=image_size, patch_size=patch,
        ),
        text_config=LlamaConfig(**_text_kwargs(len(tok), layers)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.set_attn_implementation(attn)
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok,
        patch_size=patch,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token="<image>",
    )
    return model, proc


def tiny_qwen2_5_vl(layers: int = 4, attn: str = "sdpa", seed: int = 0, qwen2: bool = False):
    """``Qwen2_5_VLForConditionalGeneration`` (or Qwen2-VL) with M-RoPE, window attention and its processor."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if qwen2:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

    tok = tiny_tokenizer(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])
    text = _text_kwargs(len(tok), layers)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if qwen2:
        vision.update(embed_dim=32, mlp_ratio=2)
        vision["hidden_size"] = 64
    else:
        vision.update(intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    cfg = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<unk>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    model.set_attn_implementation(attn)

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):  # the video processor lookup needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            if arg is None and name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    proc = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)
    return model, proc


def qwen_image_prompt(text: str) -> str:
    return f"<|vision_start|> <|image_pad|> <|vision_end|> {text}"


def random_image(seed: int = 0, size: tuple[int, int] = (56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def image_context(features: torch.Tensor, **fields):
    """A hand-built :class:`~tokensieve.context.ImageContext` for method tests: one image, every token a
    candidate, one crop, no always-kept tokens, a ``1 x n`` grid unless ``fields`` say otherwise."""
    from .context import ImageContext

    n = features.shape[0]
    defaults = dict(
        sample=0,
        image=0,
        n_tokens=n,
        token_index=torch.arange(n),
        features=features,
        grid_rc=torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1),
        grid_hw=(1, n),
        groups=torch.zeros(n, dtype=torch.long),
        always_keep=torch.zeros(n, dtype=torch.bool),
    )
    defaults.update({key: value for key, value in fields.items() if value is not None})
    return ImageContext(**defaults)
