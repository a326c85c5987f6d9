"""Serving: an OpenAI-compatible HTTP API (`api`) and a web page (`web`), one batcher in front of the engine."""
