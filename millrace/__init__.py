"""millrace: a self-hostable, OpenAI-compatible Batch API for LLM inference on Kafka."""

__version__ = "0.1.0"
