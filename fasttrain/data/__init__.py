"""Data: sources (local files, the embedded corpus), generated conversation tasks, token shards,
best-fit packing, and the loader the stages use."""
from fasttrain.data.packing import PackedBatch, Packer, pack_documents, pack_documents_reference, packing_backend
from fasttrain.data.shards import ShardError, TokenShard, rank_slice, tokenize_to_shards, write_shard
from fasttrain.data.sources import (DataError, default_corpus_files, iter_conversations, iter_documents, iter_gsm8k,
                                    iter_multiple_choice, source_files)
from fasttrain.data.tasks import (ArithmeticTask, GreetingTask, IdentityTask, LetterCountTask, SpellingTask, Task,
                                  TaskMixture, default_mid_mixture, default_sft_mixture)
