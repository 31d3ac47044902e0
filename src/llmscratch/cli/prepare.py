"""`llmscratch prepare`: a corpus (files, folders, globs, a Hugging Face dataset) into token
shards that `llmscratch pretrain --data FOLDER` trains from."""

from __future__ import annotations

import sys

from .args import add_command, add_config_flags, config_from_args


def cmd_prepare(args) -> int:
    """Tokenize a corpus larger than memory into fixed-size token shards (uint16/uint32) with a
    manifest (tokens, sha256 per shard, tokenizer fingerprint), streaming it with --workers
    processes. Validation is held-out documents (by a hash of each document's text), written
    as their own shards. Interrupted, the same command resumes; the shards are byte-identical
    whatever --workers is. Bytes that are not UTF-8 become U+FFFD and are counted."""
    from ..data.prepare import PrepareConfig, prepare

    cfg = config_from_args(PrepareConfig, args)
    try:
        result = prepare(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards stay in {cfg.out}; run the same command to resume",
              file=sys.stderr)
        return 130
    if result.interrupted:
        print(f"\ninterrupted after {result.shards_written} shard(s); run the same command to resume",
              file=sys.stderr)
        return 130
    m = result.manifest
    if result.replaced_bytes:
        print(f"warning: {result.replaced_bytes:,} byte(s) were not UTF-8 and became U+FFFD (first: "
              f"{result.first_bad})", file=sys.stderr)
    if not result.shards_written and m.get("seconds") is not None and not result.replaced_bytes:
        print(f"{result.out} already holds this prepared corpus")
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"train: {tr['tokens']:,} tokens in {len(tr['shards'])} shard(s), {tr['documents']:,} documents, "
          f"{tr['bytes']:,} bytes of text")
    print(f"val:   {va['tokens']:,} tokens in {len(va['shards'])} shard(s), {va['documents']:,} documents")
    if m["val_fraction"] > 0 and not va["tokens"]:
        print("warning: no document fell in the validation split; raise --val-fraction (pretrain needs one)",
              file=sys.stderr)
    print(f"tokenizer: {m['tokenizer']['spec']} ({m['tokenizer']['vocab_size']:,} ids, {m['dtype']}); "
          f"manifest: {result.out / 'manifest.json'}")
    print(f"try: llmscratch pretrain --data {result.out} --tokenizer {m['tokenizer']['spec']} --out runs/prepared")
    return 0


def register(sub) -> None:
    """Add `prepare` to the subcommands."""
    from ..data.prepare import PrepareConfig

    p = add_command(sub, "prepare", cmd_prepare, "tokenize a corpus into token shards for pretrain --data", [
        "llmscratch prepare corpus.txt --out data/corpus --tokenizer bpe:8192",
        "llmscratch prepare 'crawl/*.jsonl.zst' --out data/crawl --tokenizer gpt2 --workers 8",
        "llmscratch prepare hf:HuggingFaceFW/fineweb-edu:sample-10BT --out data/fineweb --tokenizer gpt2",
        "llmscratch pretrain --data data/crawl --tokenizer gpt2 --out runs/crawl",
    ])
    p.add_argument("input", help="a file (.txt, .jsonl, .parquet; .txt/.jsonl may be .gz or .zst), a folder of "
                   "them, a quoted glob, or hf:NAME[:CONFIG]")
    add_config_flags(p, PrepareConfig, skip=("input",))
