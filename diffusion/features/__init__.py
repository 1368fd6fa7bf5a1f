"""Sampling features that plug into sample.py: prompts, classifier and CLIP guidance, in-painting."""
