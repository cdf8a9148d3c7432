"""Bridges from the libraries people run models with to spanfill's ops.

* :mod:`spanfill.integrations.transformers`: ``attn_implementation="spanfill"``
  for padded encoder batches (needs ``transformers``).
* :mod:`spanfill.integrations.encoder_graphs` and :mod:`spanfill.integrations.encoder_packed`:
  that encoder's forward replayed as CUDA graphs, per padded shape or on the real
  tokens only.
* :mod:`spanfill.integrations.holes`: fill the KV holes of a Llama/Qwen2 prompt
  and decode from the paged cache.

Nothing is imported here, so ``import spanfill`` never needs transformers.
"""
