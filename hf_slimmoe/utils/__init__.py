"""The low-level layer: modeling helpers (`modeling`), distributed helpers (`distributed`), safe file IO and run files
(`outputs`), config-file IO (`config_io`), the token data loaders and collators (`data`) and tokenizers
(`tokenization`). It imports nothing from the layers above. Its modules are imported by path: this package re-exports
nothing, so importing one of them loads only it."""

CHUNK_BYTES = 128 * 2**20  # default budget of a chunked projection's `(chunk, V)` float32 working blocks together
