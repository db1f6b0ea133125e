"""A locally built tiny causal LM: a character tokenizer and a small transformer, saved like a hub model.

Nothing here is special-cased downstream: the factory writes a directory with `save_pretrained`, and every
later stage loads it by path through `AutoTokenizer` / `AutoModelForCausalLM`, exactly as a hub model.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
# Printable ASCII minus the rarely useful vertical whitespace, plus newline: enough for arithmetic,
# sequences, simple code and chat-like text.
CHARS = sorted(set(string.printable) - set("\r\x0b\x0c\t")) + []


def build_char_tokenizer(*, with_pad_token: bool = True) -> PreTrainedTokenizerFast:
    """One token per character; special tokens first. Decoding concatenates characters verbatim."""
    specials = [UNK, BOS, EOS] + ([PAD] if with_pad_token else [])
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split every character into its own pre-token ("isolated" keeps them, spaces included).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD if with_pad_token else None,
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "left"
    return fast


def tiny_config(
    vocab_size: int,
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
):
    common_ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch in ("llama", "mistral"):
        cls = LlamaConfig if arch == "llama" else MistralConfig
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **common_ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **common_ids,
        )
    raise ValueError(f"unknown tiny-model architecture {arch!r}; known: llama, mistral, gpt2")


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    with_pad_token: bool = True,
) -> Path:
    """Build a randomly initialised tiny causal LM and its tokenizer and save both to `out_dir`."""
    out = Path(out_dir)
    tokenizer = build_char_tokenizer(with_pad_token=with_pad_token)
    config = tiny_config(
        len(tokenizer),
        tokenizer,
        arch=arch,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_positions=max_positions,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(path: str | Path) -> int:
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
