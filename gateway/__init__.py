"""gateway: the OpenAI-compatible HTTP API (files, batches, models, admin)."""
