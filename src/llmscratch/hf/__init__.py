"""Hugging Face checkpoint folders, both ways, one module per family."""
