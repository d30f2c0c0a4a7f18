"""Tokenisation through the `tokenizers` library (no hand-written splitting).

The tiny preset trains a WordPiece tokenizer on the catalog's titles and query texts;
larger presets load the tokenizer.json that ships with a CLIP or BERT checkpoint.
Either way the tokenizer is saved in the model bundle as tokenizer.json.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def train_tokenizer(texts: list[str], vocab_size: int, context_length: int) -> Tokenizer:
    """A lower-cased, NFKC-normalised WordPiece tokenizer, deterministic for a given input.

    The library normalises and splits; the vocabulary is every character (so no word is
    ever unknown, rare ones fall back to ##pieces) plus the most frequent words, ties
    broken alphabetically. (WordPieceTrainer breaks ties in hash-map order, so two runs
    on the same titles gave different ids: a resumed training run would not match.)
    """
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    taken = set(vocab)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in taken]
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.token_to_id("[BOS]")),
                                                ("[EOS]", tok.token_to_id("[EOS]"))])
    return configure(tok, context_length)


def configure(tok: Tokenizer, context_length: int) -> Tokenizer:
    """Fixed-length output: truncate, then pad with the tokenizer's pad token (id 0 if none)."""
    pad_token = next((t for t in ("[PAD]", "<pad>", "<|endoftext|>") if tok.token_to_id(t) is not None), None)
    pad_id = tok.token_to_id(pad_token) if pad_token else 0
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token or "[PAD]")
    return tok


def tokenize_arrays(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, attention mask uint8), N x context_length, without torch.

    The encode pipeline tokenises in CPU decode workers that never import torch.
    """
    enc = tok.encode_batch(list(texts))
    ctx = len(enc[0].ids) if enc else 0
    ids = np.array([e.ids for e in enc], dtype=np.int32).reshape(len(enc), ctx)
    mask = np.array([e.attention_mask for e in enc], dtype=np.uint8).reshape(len(enc), ctx)
    return ids, mask


def tokenize(tok: Tokenizer, texts: list[str]):
    """(token ids, attention mask) as int64 torch tensors, N x context_length."""
    import torch

    ids, mask = tokenize_arrays(tok, texts)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
