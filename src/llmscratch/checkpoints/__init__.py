"""Checkpoints: the run-folder format, `load_model`, downloads from the Hub, `convert`."""
