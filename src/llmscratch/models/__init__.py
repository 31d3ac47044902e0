"""Models: the reference networks (attention, the GPT/Llama-style decoder, the BERT-style encoder)."""
