"""A tiny T5 text encoder and its word-level tokenizer for the bundled flow-matching pipelines
(SD3's ``text_encoder_3`` slot): random, frozen, saved and loaded by diffusers like a real one."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # T5's special tokens, ids 0, 1, 2 as in T5's vocabulary


def build_t5_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per word of ``words`` (whitespace split), T5's special
    tokens and T5's habit of ending every sequence with ``</s>``."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def tiny_t5_encoder(tokenizer: PreTrainedTokenizerFast, width: int) -> T5EncoderModel:
    """A 1-layer T5 encoder of model width ``width`` (the transformer's ``joint_attention_dim``)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)
