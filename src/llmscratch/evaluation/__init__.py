"""Evaluation: held-out LM loss, zero-/few-shot tasks, the lm-evaluation-harness adapter."""
