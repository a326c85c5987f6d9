"""Instruction phrasings for caption data (vistune's own wording).

Stage-1 pairs draw a brief-description request at random; detailed-description
records draw from the detail list. Varied phrasing keeps the model from tying the
task to one sentence.
"""
from __future__ import annotations

BRIEF_INSTRUCTIONS = [
    "Give a short description of this image.",
    "Summarize what the picture shows in a sentence.",
    "What does this image show? Answer briefly.",
    "Write a one-line caption for the image.",
    "Describe the scene in a few words.",
    "Briefly, what is in this picture?",
    "Provide a concise caption for this photo.",
    "Sum up the image in one sentence.",
    "Tell me in short what you see here.",
    "Caption this image.",
    "In brief, what is depicted?",
    "Offer a compact summary of the picture.",
]

DETAIL_INSTRUCTIONS = [
    "Describe this image in detail.",
    "Give a thorough description of everything in the picture.",
    "What can you see in this image? Be detailed.",
    "Walk me through the contents of this image.",
    "Provide a detailed account of the scene.",
    "Explain in detail what the picture shows.",
    "Describe every object in the image and where it is.",
    "Write a rich, detailed description of the image.",
    "Tell me everything you notice in this picture.",
    "Give an elaborate description of the scene shown.",
    "Describe the image as completely as you can.",
    "List and describe what appears in the image.",
    "What is going on in this picture? Describe it fully.",
    "Paint a detailed picture in words of this image.",
    "Describe the layout and contents of the image in depth.",
    "Offer a comprehensive description of this photo.",
]
