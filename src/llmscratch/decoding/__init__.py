"""Decoding: sampling, KV caches, ragged batches, streaming text, chat templates."""
