"""A tiny UMT5 tokenizer and text encoder in Wan's layout (``google/umt5-xxl`` at toy size).

The tokenizer is transformers' ``T5Tokenizer`` (a Unigram model, as umt5-xxl's) whose vocabulary
is T5's three special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and one piece per caption word;
``save_pretrained`` writes ``tokenizer.json``, which ``AutoTokenizer.from_pretrained`` (the
``WanPipeline`` loader) reads offline. The encoder is a random, frozen ``UMT5EncoderModel``.
"""

from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default max_sequence_length; the tokenizer's model_max_length
WORD_PREFIX = "\u2581"  # SentencePiece's word-start marker


def build_umt5_tokenizer(words: list[str]) -> T5Tokenizer:
    """A ``T5Tokenizer`` that encodes each of ``words`` as one token (ids from 3 on, in order),
    any other word as ``<unk>``, and appends ``</s>``."""
    pieces = [(WORD_PREFIX + w, -1.0) for w in dict.fromkeys(words)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)


def tiny_umt5(tokenizer: T5Tokenizer, width: int = 32) -> UMT5EncoderModel:
    """A 2-layer, ``width``-wide UMT5 encoder sized to ``tokenizer`` (random initialisation)."""
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return UMT5EncoderModel(config)
