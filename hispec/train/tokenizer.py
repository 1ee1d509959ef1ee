"""Byte-level BPE tokenizer training, saved so `AutoTokenizer.from_pretrained` loads it.

Byte-level means every string round-trips exactly (no unknown characters), which matters for
code: indentation and rare symbols survive encode/decode unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)  # ids 0..3, in this order


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens (special tokens included)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 bytes and special tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name: tok.token_to_id(t) for name, t in zip(("bos", "eos", "pad", "unk"), SPECIAL_TOKENS)}


def save_hf_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special tokens via transformers."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x for code
    )
    hf.save_pretrained(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
