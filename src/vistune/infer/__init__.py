"""Inference: one engine (`engine.Engine`) under chat, the server, the web page and prediction."""
from .engine import Completion, Engine, GenerationConfig, Prompt, PromptError, PromptTooLong

__all__ = ["Completion", "Engine", "GenerationConfig", "Prompt", "PromptError", "PromptTooLong"]
