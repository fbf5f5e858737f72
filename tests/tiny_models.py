"""Builders for tiny random-weight models used by the end-to-end tests.

Everything here is offline (nothing is downloaded) and deterministic
(``torch.manual_seed(0)`` before each model is built; the tokenizer is trained
on a corpus generated from a fixed seed).

Public API
----------
- ``build_tokenizer(words=None, extra_special_tokens=None) -> PreTrainedTokenizerFast``
- ``build_tiny_llm(path, tokenizer=None) -> str``       (LlamaForCausalLM)
- ``build_tiny_qwen2vl(path) -> str``                   (Qwen2VLForConditionalGeneration + Qwen2VLProcessor)
- ``make_images(folder, n, seed=0) -> list[tuple[str, str]]``  ([(file name, "red" | "blue")])

Special token ids (both tokenizers share the first three):
    <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2 (eos)
    Qwen2-VL only: <|vision_start|> = 3, <|image_pad|> = 4, <|vision_end|> = 5, <|video_pad|> = 6
No pad token and no bos token are set on purpose.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"

BASE_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
VISION_SPECIAL_TOKENS = [VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD]

VOCAB_SIZE = 600

# ChatML (Qwen-style) template. Content may be a string or a list of parts
# ({"type": "text", "text": ...} / {"type": "image", ...} / {"type": "video", ...}).
# Assistant content is wrapped in {% generation %} so that
# `return_assistant_tokens_mask=True` (TRL `assistant_only_loss`) works; this does
# not change the rendered text.
_CONTENT = (  # a message's content: a string, or a list of text / image / video parts
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}{%- generation -%}"
    + _CONTENT
    + "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}"
    + _CONTENT
    + "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# --------------------------------------------------------------------------- corpus

_SUBJECTS = [
    "the cat", "a dog", "my friend", "the teacher", "our team", "the model", "a student",
    "the robot", "this system", "the assistant", "a user", "the river", "my sister",
    "the old man", "a small bird", "the computer", "the city", "a young girl", "the farmer",
]
_VERBS = [
    "likes", "sees", "finds", "writes", "reads", "builds", "answers", "learns", "trains",
    "paints", "watches", "opens", "closes", "follows", "helps", "counts", "describes",
    "remembers", "explains", "carries",
]
_OBJECTS = [
    "a red square", "a blue circle", "the green tree", "a long letter", "the question",
    "a new book", "the answer", "some water", "the image", "a short story", "the data",
    "a yellow flower", "the door", "many numbers", "the small box", "a bright light",
    "the last page", "a picture of the sea", "the weather report", "a cup of tea",
]
_PLACES = [
    "in the morning", "at night", "near the house", "on the table", "in the park",
    "after lunch", "before the test", "every day", "at school", "in the kitchen",
    "by the window", "during the rain", "on monday", "on friday", "in the summer",
]
_QUESTIONS = [
    "What color is the square?", "What is in the image?", "How many cats are there?",
    "Can you help me?", "Why is the sky blue?", "Where is the nearest station?",
    "What is two plus two?", "Who wrote this book?", "Is it red or blue?",
    "Please describe the picture.", "What time is it?", "Which one is larger?",
    "Tell me a joke.", "Summarize the text.", "Translate this sentence.",
]
_ANSWERS = [
    "The square is red.", "The square is blue.", "It is a red image.", "It is a blue image.",
    "There are three cats.", "Sure, I can help you.", "Because of the way light scatters.",
    "The answer is four.", "I think it is red.", "I think it is blue.", "Yes.", "No.",
    "The picture shows a small house.", "The first one is larger.", "Hello, how are you?",
    "Thank you very much!", "Red", "Blue", "red", "blue",
]
_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024.",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ + = * / \\ @ # $ % & | < > ~ `",
    "system user assistant role content text image",
    "You are a helpful assistant.",
    "Hello world! Hello, world. HELLO WORLD.",
    "print('hello')  # code: def f(x): return x * 2",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
]


def _corpus(words: Iterable[str] | None = None, n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = list(_EXTRA) + list(_QUESTIONS) + list(_ANSWERS)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            s = s[0].upper() + s[1:]
        elif kind < 0.75:
            s = f"{rng.choice(_QUESTIONS)} {rng.choice(_ANSWERS)}"
        else:
            s = (
                f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}, "
                f"and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            )
        lines.append(s)
    if words:
        words = [str(w) for w in words]
        # repeated so that the given words get merges of their own in the small vocab
        for _ in range(20):
            lines.extend(words)
    return lines


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(words=None, extra_special_tokens=None):
    """Train a tiny byte-level BPE tokenizer (vocab ~600) and wrap it as a PreTrainedTokenizerFast.

    ``words``: optional iterable of extra strings added to the training corpus.
    ``extra_special_tokens``: optional list of additional special tokens, appended after
    ``<|endoftext|>`` (0), ``<|im_start|>`` (1), ``<|im_end|>`` (2).
    eos = ``<|im_end|>``; pad and bos are deliberately left unset.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = BASE_SPECIAL_TOKENS + list(extra_special_tokens or [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(words), trainer=trainer)
    for i, t in enumerate(specials):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        extra_special_tokens=[t for t in specials if t != IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    assert hf_tok.pad_token is None and hf_tok.bos_token is None
    return hf_tok


# --------------------------------------------------------------------------- text model


def build_tiny_llm(path, tokenizer=None):
    """Tiny LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 kv heads) + tokenizer, saved to ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = str(path)
    os.makedirs(path, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, bos_token_id=None, pad_token_id=None)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- Qwen2-VL


def build_tiny_qwen2vl(path):
    """Tiny Qwen2VLForConditionalGeneration + Qwen2VLProcessor saved to ``path``.

    Images are resized between 56*56 and 112*112 pixels, i.e. 1-4 image tokens per image
    (a 64x64 image -> 56x56 -> grid (1, 4, 4) -> 4 `<|image_pad|>` tokens).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = str(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(extra_special_tokens=VISION_SPECIAL_TOKENS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in BASE_SPECIAL_TOKENS + VISION_SPECIAL_TOKENS}
    eos_id = ids[IM_END]

    hidden, heads = 64, 4
    head_dim = hidden // heads  # 16 -> mrope_section must sum to head_dim // 2 = 8
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    assert sum(text_config["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision_config = dict(
        depth=2,
        embed_dim=32,
        hidden_size=hidden,  # merger output == text hidden size
        mlp_ratio=4,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, bos_token_id=None, pad_token_id=None)
    model.save_pretrained(path)

    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- images


def make_images(folder, n, seed=0):
    """Write ``n`` 64x64 PNGs into ``folder``: even indices mostly red ("red"), odd mostly blue ("blue").

    Returns ``[(file_name, label), ...]`` where ``file_name`` is relative to ``folder``.
    """
    import numpy as np
    from PIL import Image

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        label = "red" if i % 2 == 0 else "blue"
        img = rng.randint(0, 60, size=(64, 64, 3)).astype(np.int16)  # dark noise background
        # a large square of the class color at a random position
        size = rng.randint(36, 57)
        y, x = rng.randint(0, 64 - size + 1, size=2)
        ch = 0 if label == "red" else 2
        img[y : y + size, x : x + size, ch] = rng.randint(190, 256, size=(size, size))
        img[y : y + size, x : x + size, 1] = rng.randint(0, 50, size=(size, size))
        name = f"img_{i:04d}_{label}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="RGB").save(os.path.join(folder, name))
        out.append((name, label))
    return out


__all__ = [
    "CHAT_TEMPLATE",
    "build_tokenizer",
    "build_tiny_llm",
    "build_tiny_qwen2vl",
    "make_images",
]
