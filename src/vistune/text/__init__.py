"""Text: conversation templates, tokenizers and the one preprocessing function."""
from .encode import IGNORE_INDEX, Encoded, EncodingError, SampleTooLong, encode_conversation
from .templates import IMAGE_PLACEHOLDER, TEMPLATES, Template, TemplateError, get_template, render

__all__ = [
    "IGNORE_INDEX", "IMAGE_PLACEHOLDER", "TEMPLATES", "Encoded", "EncodingError", "SampleTooLong",
    "Template", "TemplateError", "encode_conversation", "get_template", "render",
]
