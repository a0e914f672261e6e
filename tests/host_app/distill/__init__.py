"""Distill - Small custom-corpus generative AI audio."""

__version__ = "0.1.0"
