"""A CLIPTokenizer for the world's vocabulary, written as vocab.json + merges.txt.

CLIP's tokenizer is byte-pair encoding: a word is split into characters (the last one marked with
"</w>") and merged pair by pair following merges.txt in rank order. We learn the merges on our own
vocabulary until every word is one symbol, so each vocabulary word is exactly one token.
"""
import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from .world import VOCABULARY

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 8  # start + at most 4 words + end, padded: "a crimson striped pentagram"


def learn_merges(words):
    """Byte-pair merges (in rank order) that turn every word into a single symbol."""
    segmented = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while any(len(s) > 1 for s in segmented.values()):
        pairs = Counter(p for s in segmented.values() for p in zip(s, s[1:]))
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken deterministically
        merges.append(best)
        segmented = {w: _apply_merge(s, best) for w, s in segmented.items()}
    return merges


def _apply_merge(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_tokenizer(directory):
    """Write vocab.json and merges.txt into 'directory' and return the loaded CLIPTokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(VOCABULARY)
    characters = sorted({c for w in VOCABULARY for c in w} | {w[-1] + "</w>" for w in VOCABULARY})
    tokens = [BOS, EOS] + characters + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS,
                              pad_token=EOS, unk_token=EOS, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)
