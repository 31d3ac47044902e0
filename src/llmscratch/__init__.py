"""llmscratch: a GPT-style language model built from scratch in PyTorch."""
