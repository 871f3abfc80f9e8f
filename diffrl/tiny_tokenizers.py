"""Offline tokenizers for tiny test models: a byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer.

Both are built from hand-written vocabularies (no download), then saved and reloaded through ``from_pretrained``
so they are exactly what a reloaded checkpoint holds. Used by the tiny pipelines (``diffrl.models.tiny``) and the
tiny reward models (``diffrl.rewards.tiny``); this module imports neither.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

__all__ = [
    "TINY_WORDS",
    "QWEN_SPECIAL_TOKENS",
    "tiny_clip_tokenizer",
    "tiny_qwen2_tokenizer",
    "tiny_t5_tokenizer",
]

#: Words that get a single token in both tiny tokenizers (other ascii text still tokenizes, into
#: characters, never into the unknown token).
TINY_WORDS = (
    "a an the of and on in with to next left right above below top bottom photo image picture "
    "one two three four five six red green blue yellow orange purple pink brown black white gray "
    "circle square triangle cube sphere cat dog car bird apple banana cup chair tree house "
    "circles squares triangles cubes spheres"
).split()

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_WORD_END = "</w>"
_T5_SPACE = "\u2581"  # "▁", SentencePiece's word-boundary marker


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces[:-1], pieces[1:], strict=True))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def _clip_vocab_and_merges(words: tuple[str, ...] | list[str]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocabulary in CLIP's layout: bytes, bytes + ``</w>``, merges, special tokens."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + _CLIP_WORD_END] = len(vocab)
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Run BPE with the merges so far, then append the merges that join the resulting pieces left to right
        # ("t ri", "tri an", ...). Earlier words keep their single token (new merges rank below every merge
        # they use), and each word ends as one token whichever merges earlier words introduced.
        pieces = _bpe(list(word[:-1]) + [word[-1] + _CLIP_WORD_END], ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks[(current, piece)] = len(merges)
            merges.append(f"{current} {piece}")
            current = current + piece
            if current not in vocab:
                vocab[current] = len(vocab)
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return vocab, merges


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Build a small but complete CLIP byte-level BPE tokenizer, fully offline.

    The vocabulary holds the 256 byte symbols of CLIP's ``bytes_to_unicode`` table, the same symbols
    with the end-of-word suffix ``</w>``, the merges needed to spell each word of :data:`TINY_WORDS` as
    one token, and finally ``<|startoftext|>`` (bos) and ``<|endoftext|>`` (eos, pad and unk), i.e. the
    layout of the real CLIP vocabulary.  Any text therefore tokenizes without unknown tokens.

    The ``vocab.json`` / ``merges.txt`` pair is written to a temporary directory and loaded with
    :meth:`CLIPTokenizer.from_pretrained`, the same code path a real checkpoint takes.

    Args:
        model_max_length: Padding/truncation length (CLIP uses 77; the pipelines read it from here).

    Returns:
        A :class:`transformers.CLIPTokenizer`; ``len(tokenizer)`` is the text model's vocabulary size.
    """
    vocab, merges = _clip_vocab_and_merges(TINY_WORDS)
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)
    if len(tokenizer) != len(vocab) or tokenizer.unk_token_id == tokenizer.bos_token_id:
        raise RuntimeError("tiny CLIP tokenizer did not load its hand-written vocabulary")
    return tokenizer


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities in T5's layout: ``<pad>``, ``</s>``, ``<unk>``, pieces."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_T5_SPACE, -3.0)]
    # Word-initial letters/digits, then every printable ascii character on its own: any ascii text
    # can be segmented without <unk>.  Whole words score better than their spelling, so they win.
    vocab += [(_T5_SPACE + c, -4.0) for c in string.ascii_lowercase + string.digits]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [(_T5_SPACE + w, -6.0) for w in TINY_WORDS if len(w) > 1]
    return vocab


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """Build a small T5 (SentencePiece-Unigram style) tokenizer, fully offline.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5; then come ``▁``, ``▁`` + each lower-case
    letter and digit, every printable ascii character, and ``▁`` + each word of :data:`TINY_WORDS`.
    No sentinel ``<extra_id_*>`` tokens are added.  It is built from the piece list by transformers'
    ``T5Tokenizer(vocab=...)`` (no ``spiece.model`` needed), then saved to and reloaded from a
    temporary directory, so the returned object is exactly what a pipeline reload produces
    (``T5TokenizerFast`` is an alias of ``T5Tokenizer`` in transformers 5).

    Args:
        model_max_length: Padding/truncation length.  512 allows SD3's default
            ``max_sequence_length=256`` and FLUX's maximum of 512.

    Returns:
        A :class:`transformers.T5Tokenizer`; ``len(tokenizer)`` is the encoder's vocabulary size.
    """
    vocab = _t5_vocab()
    built = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tok-") as tmp:
        built.save_pretrained(tmp)
        tokenizer = T5Tokenizer.from_pretrained(tmp)
    if len(tokenizer) != len(vocab) or tokenizer.pad_token_id != 0 or tokenizer.unk_token_id != 2:
        raise RuntimeError("tiny T5 tokenizer did not load its hand-written vocabulary")
    return tokenizer


#: The special tokens of the Qwen chat format (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def tiny_qwen2_tokenizer(words: tuple[str, ...] | list[str] = ()) -> Qwen2Tokenizer:
    """Build a small byte-level BPE :class:`~transformers.Qwen2Tokenizer` (Qwen2 / Qwen2.5-VL layout), fully offline.

    The vocabulary holds the 256 byte symbols, the merges that make each of ``words`` and of :data:`TINY_WORDS`
    one token (a word given with a leading space becomes one token with it, as ``Ġword``; the words of
    :data:`TINY_WORDS` are added both with and without a leading space), then the special tokens of the Qwen chat
    format (:data:`QWEN_SPECIAL_TOKENS`). Any text tokenizes without unknown tokens. Saved to and reloaded from a
    temporary directory, so it is what a reloaded checkpoint holds.
    """
    to_unicode = _bytes_to_unicode()

    def symbols(text: str) -> str:
        return "".join(to_unicode[b] for b in text.encode("utf-8"))

    vocab = {c: i for i, c in enumerate(to_unicode.values())}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    entries = list(words) + [w for word in TINY_WORDS for w in (word, " " + word)]
    for word in dict.fromkeys(symbols(w) for w in entries):
        pieces = _bpe(list(word), ranks)
        current = pieces[0]
        for piece in pieces[1:]:
            ranks[(current, piece)] = len(merges)
            merges.append((current, piece))
            current = current + piece
            if current not in vocab:
                vocab[current] = len(vocab)
    built = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    built.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    with tempfile.TemporaryDirectory(prefix="tiny-qwen-tok-") as tmp:
        built.save_pretrained(tmp)
        tokenizer = Qwen2Tokenizer.from_pretrained(tmp)
    if len(tokenizer) != len(vocab) + len(QWEN_SPECIAL_TOKENS):
        raise RuntimeError("tiny Qwen2 tokenizer did not load its hand-written vocabulary")
    return tokenizer
