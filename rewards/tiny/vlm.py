"""A tiny random-weight Qwen2.5-VL, built offline, for the tests of the VLM yes-probability reward.

:func:`build_tiny_vlm` saves a ``Qwen2_5_VLForConditionalGeneration`` (2 text layers of width 32, 2 vision blocks of
width 32, about 120k parameters) with its processor: a Qwen2-VL image processor (images resized to between 56x56 and
112x112 pixels, so a 64x64 image is 4 visual tokens) and a byte-level BPE tokenizer written here (the 256 byte
symbols, a handful of merges that make ``Yes``/``yes``/`` Yes``/`` yes`` and the ``No`` variants single tokens, the
special tokens of the Qwen chat format) with a chat template of the same format. ``AutoProcessor`` and
``AutoModelForImageTextToText`` load the directory offline; building takes about a second, a forward on two 64x64
images a few milliseconds.

The weights are random except the output rows of the yes/no tokens, which are calibrated (see
:func:`_calibrate_answers`) so that P(yes) spreads over (0, 1), depends on both image and prompt, and the yes/no
tokens carry about 99% of the next-token probability (all eight are in any top 20), like a real VLM's answer.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_vlm", "TINY_CHAT_TEMPLATE", "SPECIAL_TOKENS"]

# The Qwen chat format: a default system turn, then `<|im_start|>role\n...<|im_end|>\n` per message, each image as
# `<|vision_start|><|image_pad|><|vision_end|>` (the processor expands <|image_pad|> to one token per merged patch).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

ANSWER_LOGIT_SCALE = 3.0  # typical |logit| of a yes/no token after calibration
ANSWER_LOGIT_BOOST = 8.0  # how far the yes/no logits sit above the other tokens
_YES = ("Yes", "yes", " Yes", " yes")
_NO = ("No", "no", " No", " no")

# Pairs merged in this order (byte-level symbols: "Ġ" is the space byte).
_MERGES = [
    ("Y", "e"),
    ("Ye", "s"),
    ("y", "e"),
    ("ye", "s"),
    ("Ġ", "Yes"),
    ("Ġ", "yes"),
    ("N", "o"),
    ("n", "o"),
    ("Ġ", "No"),
    ("Ġ", "no"),
]


def _tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(_MERGES),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def _calibrate_answers(model, processor, tok) -> None:
    """Random weights put every last-position hidden state along one shared direction, so P(yes) would be nearly
    constant (and far from 0.5); remove that direction from the yes/no rows of the output layer and rescale them,
    so that P(yes) spreads over (0, 1) and depends on the image and the prompt; then lift all yes/no logits by the
    same amount, so that the answer tokens carry most of the next-token probability (and are all in a top 20)."""
    import numpy as np
    import torch
    from PIL import Image

    ys, xs = np.mgrid[0:64, 0:64] / 63.0
    images = [
        Image.fromarray((255 * np.stack([xs, ys, 1 - xs], -1)).astype(np.uint8)),
        Image.fromarray((255 * np.stack([0.5 + 0.5 * np.sin(9 * xs), ys * xs, 1 - ys], -1)).astype(np.uint8)),
        Image.fromarray((255 * np.stack([ys, 1 - ys, (xs > 0.5)], -1)).astype(np.uint8)),
    ]
    texts = []
    for prompt in ("a cat", "a red car on a road", "two birds"):
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tok.padding_side = "left"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -1]
        mean = hidden.mean(0)
        mean = mean / mean.norm()
        spread = (hidden - hidden.mean(0)).norm(dim=-1).mean()
        answer_ids = [i for w in (*_YES, *_NO) for i in tok.encode(w, add_special_tokens=False)]
        rows = model.lm_head.weight[answer_ids]
        rows = rows - (rows @ mean)[:, None] * mean[None, :]
        rows = rows / rows.norm(dim=-1, keepdim=True) * (ANSWER_LOGIT_SCALE / spread)
        # The same vector added to every yes/no row shifts all their logits equally (the yes/no ratio is unchanged)
        # and puts them far above the other tokens, as in a real VLM asked a yes/no question.
        rows = rows + (ANSWER_LOGIT_BOOST / (hidden @ mean).mean()) * mean[None, :]
        model.lm_head.weight[answer_ids] = rows


def build_tiny_vlm(path: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random Qwen2.5-VL and its processor to ``path``; returns the directory."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = 64 * ((len(tok) + 63) // 64)

    image_kwargs = dict(
        min_pixels=56 * 56, max_pixels=28 * 28 * 16, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**image_kwargs),
        chat_template=TINY_CHAT_TEMPLATE,
    )

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            initializer_range=0.1,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _calibrate_answers(model, processor, tok)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
