"""Offline construction of the embedded model's tokenizer, processor and config, and its loader.

Nothing here downloads anything: the tokenizer is a word-level ``tokenizers`` model over the synthetic
task's vocabulary (lower-cased, ``?`` split from the word before it), the image processor is the PIL backend
(torchvision is not required), and the model is a plain ``LlavaForConditionalGeneration`` (CLIP vision
tower with CLS, 2-layer GELU projector, Llama).

Prompt format (the chat template :data:`CHAT_TEMPLATE` writes it)::

    <s> <image> what color is the circle ? answer: red </s> how many squares ? answer:

A user turn is its images (``<image>``, expanded by the processor to one placeholder per visual token) and
its question; each answer follows ``answer:`` and ends with ``</s>``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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

# Messages -> prompt: images then text for a user turn, "answer: <text> </s>" for an assistant turn, and
# "answer:" as the generation prompt. System messages are ignored (the model has none).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}answer: {% endif -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}<image> {% elif part['type'] == 'text' -%}{{ part['text'] | trim }} {% endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'assistant' -%}</s> {% endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}answer:{%- endif -%}"
)


class OutOfVocabularyWarning(UserWarning):
    """A prompt holds words the embedded model does not know: they became ``<unk>``."""


def configure_text_pipeline(core: Tokenizer) -> Tokenizer:
    """Lower-case, split on whitespace and split ``?`` off words ("circle?" -> "circle ?")."""
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\?"), behavior="isolated")]
    )
    return core


def build_tokenizer(words: tuple[str, ...] = VOCABULARY_WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words``; prepends ``<s>`` like Llama tokenizers; carries the chat template."""
    vocab = {word: index for index, word in enumerate(SPECIAL_TOKENS + tuple(words))}
    core = configure_text_pipeline(Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK)))
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
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """LLaVA processor: CLIP-normalised 224x224 images, one ``<image>`` per patch (CLS dropped)."""
    tokenizer = tokenizer or build_tokenizer()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return EmbeddedProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that the tokenizer maps to ``<unk>`` (as written in ``text``)."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    unk = tokenizer.unk_token_id
    return [text[a:b] for token, (a, b) in zip(encoding.ids, encoding.offsets, strict=True) if token == unk]


class EmbeddedProcessor(LlavaProcessor):
    """``LlavaProcessor`` that warns (:class:`OutOfVocabularyWarning`) when a prompt has unknown words.

    Saved files name the plain ``LlavaProcessor``, so ``AutoProcessor.from_pretrained`` still loads them.
    """

    def __call__(self, images=None, text=None, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        unknown = sorted({w for t in texts if isinstance(t, str) for w in unknown_words(self.tokenizer, t)})
        if unknown:
            known = sorted(w for w in self.tokenizer.get_vocab() if not w.startswith("<"))
            warnings.warn(
                f"the embedded model does not know {unknown}: they become <unk> and the answer is unreliable; "
                f"ask with its words ({' '.join(known)}), e.g. 'what color is the circle ?' "
                "(the prompt format is in docs/embedded.md)",
                OutOfVocabularyWarning,
                stacklevel=2,
            )
        return super().__call__(images=images, text=text, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        plain = LlavaProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            patch_size=self.patch_size,
            num_additional_image_tokens=self.num_additional_image_tokens,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            image_token=self.image_token,
            chat_template=self.chat_template,
        )
        return plain.save_pretrained(*args, **kwargs)


def as_embedded_processor(processor: LlavaProcessor) -> EmbeddedProcessor:
    """Wrap a loaded ``LlavaProcessor`` (same components and settings) in :class:`EmbeddedProcessor`."""
    return EmbeddedProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        image_token=processor.image_token,
        chat_template=processor.chat_template,
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_hidden: int = 128,
    vision_layers: int = 3,
    text_hidden: int = 128,
    text_layers: int = 3,
    heads: int = 4,
    vision_feature_layer: int = -1,
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
        vision_feature_layer=vision_feature_layer,
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
    path: str | Path = EMBEDDED_DIR,
) -> tuple[LlavaForConditionalGeneration, EmbeddedProcessor]:
    """Load the shipped model (or a checkpoint folder ``path``) and its processor with ordinary HF calls."""
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    # AutoProcessor resolves LlavaProcessor + LlavaImageProcessorPil from the saved files, offline.
    return model, as_embedded_processor(AutoProcessor.from_pretrained(path))
