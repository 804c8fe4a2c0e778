"""Offline construction of the embedded model's tokenizer, processor and config, and its loader.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model over the synthetic
task's vocabulary, the image processor is the PIL backend (torchvision is not required), and the model is
a plain ``LlavaForConditionalGeneration`` (CLIP vision tower with CLS, 2-layer GELU projector, Llama).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from tokensieve.embedded.synthetic import IMAGE_SIZE, IMAGE_TOKEN, PATCH_SIZE, VOCABULARY_WORDS

EMBEDDED_DIR = Path(__file__).resolve().parent / "model"

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE_TOKEN)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the synthetic vocabulary; prepends ``<s>`` like Llama tokenizers."""
    vocab = {word: index for index, word in enumerate(SPECIAL_TOKENS + VOCABULARY_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LLaVA processor: CLIP-normalised 224x224 images, one ``<image>`` per patch (CLS dropped)."""
    tokenizer = tokenizer or build_tokenizer()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    text_hidden: int = 128,
    text_layers: int = 3,
    heads: int = 4,
) -> LlavaConfig:
    """A small LLaVA-1.5-shaped config: CLIP ViT (patch 14, CLS) + GELU MLP projector + Llama."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=(8 * text_hidden) // 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_model(config: LlavaConfig, seed: int = 0) -> LlavaForConditionalGeneration:
    """Randomly initialised model with generation defaults for short greedy answers."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    text = config.text_config
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.do_sample = False
    return model


def load_embedded(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load the shipped model and its processor from :data:`EMBEDDED_DIR` with ordinary HF calls."""
    model = LlavaForConditionalGeneration.from_pretrained(
        EMBEDDED_DIR, dtype=dtype, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    # AutoProcessor resolves LlavaProcessor + LlavaImageProcessorPil from the saved files, offline.
    processor = AutoProcessor.from_pretrained(EMBEDDED_DIR)
    return model, processor
