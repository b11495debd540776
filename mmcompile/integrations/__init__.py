"""Integrations with libraries whose objects reach capture (transformers' KV caches)."""
