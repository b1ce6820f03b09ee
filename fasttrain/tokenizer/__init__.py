"""Byte-level BPE: training written here (numba), encoding through tiktoken.

    pretokenize.py   the split regex as a numba state machine (`split_text`)
    bpe.py           training: count the unique chunks, then merge (`train_bpe`, `chunk_counts`)
    core.py          the `Tokenizer`: ids, save / load / fingerprint, encoding through tiktoken
    chat.py          the chat format and the SFT mask rule (`render_conversation`,
                     `render_prompt`, `check_conversation`)

Everything public is importable from here: `from fasttrain.tokenizer import Tokenizer`.
"""
from fasttrain.tokenizer.bpe import chunk_counts, train_bpe
from fasttrain.tokenizer.chat import (CHAT_TOKENS, ConversationError, check_conversation, render_conversation,
                                      render_prompt)
from fasttrain.tokenizer.core import MIN_VOCAB_SIZE, SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer
from fasttrain.tokenizer.pretokenize import CL100K_PATTERN, SPLIT_PATTERN, split_text

__all__ = ["CHAT_TOKENS", "CL100K_PATTERN", "MIN_VOCAB_SIZE", "SPECIAL_TOKENS", "SPLIT_PATTERN", "TOKENIZER_FILE",
           "ConversationError", "Tokenizer", "check_conversation", "chunk_counts", "render_conversation",
           "render_prompt", "split_text", "train_bpe"]
