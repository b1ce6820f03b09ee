"""Data: sources (local files, the embedded corpus), generated conversation tasks, token shards,
best-fit packing, and the loader the stages use. Import from the modules (`fasttrain.data.packing`,
`.sources`, `.shards`, `.tasks`, `.loader`): this package imports nothing itself, so code that reads
only the sources (the tokenizer command) does not import torch with the packing and the loader."""
