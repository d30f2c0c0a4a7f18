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
    """Truncate to the context length, then pad each batch to its longest sequence (not
    to the context length: titles are far shorter) with the pad token (id 0 if none)."""
    pad_token = next((t for t in ("[PAD]", "<pad>", "<|endoftext|>") if tok.token_to_id(t) is not None), None)
    pad_id = tok.token_to_id(pad_token) if pad_token else 0
    tok.enable_truncation(max_length=context_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token or "[PAD]")
    return tok


def tokenize_arrays(tok: Tokenizer, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, attention mask uint8), N x the longest sequence (or ``length``),
    without torch: the encode pipeline tokenises in CPU decode workers that never import it.
    """
    enc = tok.encode_batch(list(texts))
    width = max([len(e.ids) for e in enc] + [length or 0])
    pad_id = (tok.padding or {}).get("pad_id", 0)
    ids = np.full((len(enc), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(enc), width), dtype=np.uint8)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = e.attention_mask
    return ids, mask


def tokenize(tok: Tokenizer, texts: list[str], length: int | None = None):
    """(token ids, attention mask) as int64 torch tensors, N x the longest sequence (or
    ``length``: training pads every text set to the context length so they stack)."""
    import torch

    ids, mask = tokenize_arrays(tok, texts, length)
    return torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
