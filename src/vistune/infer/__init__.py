"""Inference: one engine (`engine.Engine`) under chat, the server, the web page and prediction."""
from .chat import Chat
from .engine import Engine
from .types import Completion, EncodedPrompt, GenerationConfig, Prompt, PromptError, PromptTooLong

__all__ = ["Chat", "Completion", "EncodedPrompt", "Engine", "GenerationConfig", "Prompt", "PromptError",
           "PromptTooLong"]
