"""Data: sources (local files, the embedded corpus), generated conversation tasks, token shards,
best-fit packing, and the loader the stages use.

The names below are importable from here (`from fasttrain.data import pack_documents`); each
module is loaded on first use, so code that reads only the sources (the tokenizer command) does
not import torch with the packing and the loader."""
import importlib

_EXPORTS = {
    "packing": ("PackedBatch", "pack_documents", "pack_documents_reference", "pack_stream", "packing_backend"),
    "shards": ("ShardError", "TokenShard", "rank_slice", "tokenize_to_shards", "write_shard"),
    "sources": ("DataError", "default_corpus_files", "iter_conversations", "iter_documents", "iter_gsm8k",
                "iter_multiple_choice", "source_files"),
    "tasks": ("ArithmeticTask", "GreetingTask", "IdentityTask", "LetterCountTask", "SpellingTask", "Task",
              "TaskMixture", "default_mid_mixture", "default_sft_mixture"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
