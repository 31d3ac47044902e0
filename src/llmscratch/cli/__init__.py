"""The `llmscratch` command line, the top layer: it imports the library, nothing imports it.

- `main.py`: the entry point `main(argv)`, the parser, and the subcommands that load a
  model to run it (generate, eval, serve) or fetch one (download, convert).
- `pretrain.py`, `info.py`, `bench.py`: `pretrain` (and `--resume`), `info`, `bench`.
- `encoder.py`, `tasks.py`, `dpo.py`: fill-mask and embed, eval tasks, finetune dpo.
- `finetune.py`: the fine-tuning and assistant subcommands (finetune classify/instruct,
  classify, chat, eval instruct).
- `args.py`: the one generator that turns typed config dataclasses into flags, help text
  and `--config` TOML files.
"""

from .main import EvalArgs, GenerateArgs, ServeArgs, build_parser, main

__all__ = ["EvalArgs", "GenerateArgs", "ServeArgs", "build_parser", "main"]
