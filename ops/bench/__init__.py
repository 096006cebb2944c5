"""`millrace bench`: vLLM direct vs the pipeline, and streaming latency."""
