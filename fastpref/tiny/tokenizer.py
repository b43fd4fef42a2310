"""A tiny CLIP tokenizer whose BPE vocabulary is learnt from the procedural captions."""

from collections import Counter

from transformers import CLIPTokenizer

END_OF_WORD = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-pair merges until every word of ``words`` is one token.

    Returns ``(vocab, merges)`` in the CLIP layout: tokens that end a word carry ``</w>``,
    the vocabulary holds every single character, every merge result and the special tokens.
    """
    segmentations = {w: tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w in sorted(set(words))}
    vocab = sorted({sym for seg in segmentations.values() for sym in seg} | {c for w in segmentations for c in w})
    merges: list[tuple[str, str]] = []
    while any(len(seg) > 1 for seg in segmentations.values()):
        pairs = Counter(p for seg in segmentations.values() for p in zip(seg, seg[1:], strict=False))
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        merges.append(best)
        merged = best[0] + best[1]
        vocab.append(merged)
        for w, seg in segmentations.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segmentations[w] = tuple(out)
    tokens = list(dict.fromkeys(vocab)) + list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer(words: list[str], model_max_length: int) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` that encodes each of ``words`` as a single token."""
    vocab, merges = learn_bpe(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
