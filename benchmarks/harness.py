"""Speed measurements: the machine's own limits, training throughput and generation speed.

The harness behind `llmscratch bench` (which loads this file from a source checkout) and
the scripts beside it. It lives outside the installed package because it imports peers.
Our rows run with the kernels applied (`llmscratch.kernels.apply_kernels`), as the CLI
and the trainer do: each kernel where it was measured faster on this machine, or every
applicable one with `llmscratch bench --kernels`. Each decoding row is set against the
reference model in the same run (`vs_reference`, and the `path` each shape class took),
so a kernel that slows decoding shows as a ratio below 1; `kernels=False`
(`llmscratch bench --no-kernels`) measures the reference model only. Every row records what actually ran (`ran`: batch, sequence
length, activation and weight dtypes, seen by a hook on the first projection), so a row
cannot claim a shape or precision it did not run.

Every figure is reported against what the hardware can do (measured matmul GFLOP/s), and
against peers on the same shapes in the same run when they are installed: `transformers`'
GPT2LMHeadModel, and the book's own package (`pip install --no-deps llms-from-scratch`; its
declared dependencies include TensorFlow, which none of its GPT code needs).
Implementations are interleaved round by round, so a burst of machine noise hits all of
them alike, and medians are reported. Peers are imported lazily: the package itself never
needs them.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from llmscratch.kernels import apply_kernels, lm_head_loss, reuse_freed_memory
from llmscratch.models.gpt import GPT, GPTConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 2048, device="cpu", seconds: float = 1.0) -> float:
    """Measured GFLOP/s of an n x n x n `torch.mm` (best of a few timed bursts)."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def memory_bandwidth(mb: int = 256, device="cpu") -> float:
    """GB/s of a large tensor copy (bytes read + bytes written)."""
    device = torch.device(device)
    a = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def interleave(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@dataclass
class TrainShape:
    preset: str
    batch_size: int
    seq_len: int


def _first_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The first matmul layer of `model` (`nn.Linear` and its kernel/int8 variants, or
    transformers' `Conv1D`): its output shows the batch, length and compute dtype."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Conv1D", "Int8Linear"):
            return m
    raise ValueError(f"no linear layer in {type(model).__name__}")


def record_run(model: torch.nn.Module) -> dict:
    """A dict that a forward hook on `model`'s first projection fills with what the last
    call actually ran: `batch`, `seq_len` (of the call's first forward: the prefill when
    generating), `dtype` (of the activations) and `weight_dtype`."""
    ran: dict = {}
    layer = _first_projection(model)

    def hook(module, inputs, out):
        if not ran.get("_seen"):
            ran.update(_seen=True, batch=out.shape[0], seq_len=out.shape[1] if out.dim() > 2 else 1,
                       dtype=str(out.dtype).removeprefix("torch."),
                       weight_dtype=str(module.weight.dtype).removeprefix("torch."))

    layer.register_forward_hook(hook)
    return ran


def _recorded(fn: Callable[[], object], ran: dict) -> Callable[[], object]:
    """`fn`, resetting `ran` before each call so it describes the latest one."""

    def call():
        ran.pop("_seen", None)
        return fn()

    call.ran = ran
    return call


def _train_step(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                B: int, T: int, amp: torch.dtype | None, device: torch.device) -> Callable[[], None]:
    """A closure doing one forward (`loss_of(tokens)`, under autocast when `amp`) + backward
    + fused AdamW step of `model` on a fixed batch of random tokens. Its `.ran` says what
    the last call ran (`record_run`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    x = torch.randint(0, vocab_size, (B, T), device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    def step():
        with ctx():
            loss = loss_of(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    return _recorded(step, record_run(model))


def ours_train_step(cfg: GPTConfig, B: int, T: int, amp: torch.dtype | None, device="cpu",
                    compile: bool = False, checkpointing: bool = False,
                    kernels: bool = True) -> tuple[Callable[[], None], float]:
    """A closure doing one forward + backward + fused AdamW step of our GPT (with the
    kernels applied unless `kernels=False`), and its training FLOPs per token."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    if kernels:
        apply_kernels(model)
    model.gradient_checkpointing = checkpointing

    def loss_of(x):  # what the trainer does per micro-batch
        return lm_head_loss(model, model.hidden_states(x), x)

    if compile:
        loss_of = torch.compile(loss_of)

    return _train_step(model, loss_of, cfg.vocab_size, B, T, amp, device), model.flops_per_token(T)


def hf_train_step(cfg: GPTConfig, B: int, T: int, amp: torch.dtype | None, device="cpu") -> Callable[[], None]:
    """The same step on `transformers`' GPT2LMHeadModel (sdpa attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device(device)
    hcfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0)
    hcfg._attn_implementation = "sdpa"  # transformers' fastest CPU attention
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hcfg).to(device).train()
    return _train_step(model, lambda x: model(x, labels=x).loss, cfg.vocab_size, B, T, amp, device)


def book_config(cfg: GPTConfig) -> dict:
    """Our config in the dictionary form of the book's `GPTModel` (llms-from-scratch)."""
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.n_embd,
            "n_heads": cfg.n_head, "n_layers": cfg.n_layer, "drop_rate": 0.0, "qkv_bias": cfg.qkv_bias}


def book_model(cfg: GPTConfig, fast: bool = False) -> torch.nn.Module:
    """The book's `GPTModel` (or its sdpa `GPTModelFast`) at our shape, with its output head
    tied to the token embedding as GPT-2's (and ours) is. The book builds the head untied
    (about 163M parameters at the 124m shape instead of 124M); tying changes no FLOP of the
    forward or backward, only the optimizer's work and memory, so the rows compare like
    with like."""
    from llms_from_scratch.ch04 import GPTModel, GPTModelFast

    model = (GPTModelFast if fast else GPTModel)(book_config(cfg))
    model.out_head.weight = model.tok_emb.weight
    return model


def book_train_step(cfg: GPTConfig, B: int, T: int, amp: torch.dtype | None, device="cpu",
                    fast: bool = False) -> Callable[[], None]:
    """The same step on the book's model (`book_model`), with its loss as the book computes
    it: full logits, then cross-entropy. Raises ImportError when the `llms-from-scratch`
    package is not installed."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = book_model(cfg, fast).to(device).train()

    def loss_of(x):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())

    return _train_step(model, loss_of, cfg.vocab_size, B, T, amp, device)


def bench_training(shapes: list[TrainShape], rounds: int = 3, device="cpu", peers: bool = True,
                   peak_fp32: float | None = None, peak_bf16: float | None = None,
                   kernels: bool = True) -> list[dict]:
    """Tokens/s and MFU of a training step for each shape, interleaved: ours and
    transformers', each in fp32 and under bf16 autocast, and the book's GPTModel (fp32) and
    GPTModelFast (fp32 and bf16 autocast). Missing peers are skipped.

    Returns:
        One dict per (shape, implementation): `shape`, `impl`, `tokens_per_s`, `tflops`,
        `ran` (what the step ran, `record_run`), ratios to the peers and MFU."""
    rows = []
    for shape in shapes:
        cfg = GPTConfig.from_name(shape.preset, context_length=max(shape.seq_len, 1))
        B, T = shape.batch_size, shape.seq_len
        fns: dict[str, Callable[[], None]] = {}
        fns["llmscratch fp32"], flops_tok = ours_train_step(cfg, B, T, None, device, kernels=kernels)
        fns["llmscratch bf16-autocast"], _ = ours_train_step(cfg, B, T, torch.bfloat16, device, kernels=kernels)
        if peers:
            try:
                fns["transformers fp32 (sdpa)"] = hf_train_step(cfg, B, T, None, device)
                fns["transformers bf16-autocast"] = hf_train_step(cfg, B, T, torch.bfloat16, device)
            except ImportError:
                pass
            try:
                fns["book GPTModel fp32"] = book_train_step(cfg, B, T, None, device)
                fns["book GPTModelFast fp32"] = book_train_step(cfg, B, T, None, device, fast=True)
                fns["book GPTModelFast bf16-autocast"] = book_train_step(cfg, B, T, torch.bfloat16,
                                                                         device, fast=True)
            except ImportError:
                pass
        secs = interleave(fns, rounds)
        peer_best = min((s for name, s in secs.items() if not name.startswith("llmscratch")), default=None)
        peer_best_fp32 = min((s for name, s in secs.items()
                              if not name.startswith("llmscratch") and "fp32" in name), default=None)
        for name, s in secs.items():
            tps = B * T / s
            row = {"shape": f"{shape.preset} {B}x{T}", "impl": name, "tokens_per_s": tps,
                   "tflops": flops_tok * tps / 1e12, "ran": _ran(fns[name])}
            if name.startswith("llmscratch"):
                row["kernels"] = kernels
            if peer_best:
                row["vs_fastest_peer"] = peer_best / s
            if peer_best_fp32:
                row["vs_fastest_fp32_peer"] = peer_best_fp32 / s
            if peak_fp32:
                row["mfu_vs_fp32_peak"] = flops_tok * tps / (peak_fp32 * 1e9)
            if peak_bf16:
                row["mfu_vs_bf16_peak"] = flops_tok * tps / (peak_bf16 * 1e9)
            rows.append(row)
        del fns
        gc.collect()
    return rows


def bench_generation(preset: str = "gpt2-124m", batch_size: int = 1, prompt_len: int = 20,
                     new_tokens: int = 200, rounds: int = 3, device="cpu", peers: bool = True,
                     uncached: bool = True, kernels: bool | str = True) -> tuple[list[dict], bool | None]:
    """Greedy decoding tokens/s: ours with the KV cache (fp32, bf16 and int8 weights), without
    it, and transformers' `generate` on the same weights.

    With `kernels` (True: each kernel where measured faster, as the CLI does; `"force"`:
    every applicable kernel), each KV-cache row runs the kernel model and, beside it in the
    same interleaved rounds, the reference model (`... no-kernels` rows); the kernel row
    records `vs_reference` (its speed over the reference's: below 1 is a regression) and
    `path` (`kernels.kernel_path`: which path each shape class took). `kernels=False` runs
    the reference model only, under the plain names.

    Returns:
        `(rows, identical)`: rows as `bench_training`'s (`ran` describes the prefill), and
        whether our fp32 greedy tokens equal transformers' (None when transformers is not
        installed).
    """
    import tempfile

    from llmscratch.decoding.generate import generate
    from llmscratch.kernels import kernel_path

    device = torch.device(device)
    torch.manual_seed(0)
    cfg = GPTConfig.from_name(preset)
    base = GPT(cfg).to(device).eval()
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len), device=device)
    dtypes = ["fp32", "bf16"] + (["int8"] if device.type == "cpu" else [])
    fns: dict[str, Callable[[], object]] = {}
    models: dict[str, torch.nn.Module] = {}  # name -> model run
    references: dict[str, str] = {}  # kernel row -> its reference row
    for suffix, with_kernels in [("", kernels)] + ([(" no-kernels", False)] if kernels else []):
        for dt in dtypes:
            model = GPT(cfg).to(device).eval()
            model.load_state_dict(base.state_dict())
            if dt == "bf16":  # the weights' precision first, then the kernels: as `load_model` does
                model.to(torch.bfloat16)
            if dt == "int8":  # as `load_model(dtype="int8")` does
                from llmscratch.kernels.quantize import quantize_int8

                quantize_int8(model)
            if with_kernels:  # an int8 model takes none (`apply_kernels`)
                apply_kernels(model, force=with_kernels == "force")
            name = f"llmscratch KV cache {dt}{suffix}"
            fns[name] = (lambda m: lambda: generate(m, idx, new_tokens))(model)
            models[name] = model
            if suffix:
                references[f"llmscratch KV cache {dt}"] = name
    ours = models["llmscratch KV cache fp32"]
    if uncached:
        fns["llmscratch no cache fp32"] = lambda: generate(ours, idx, new_tokens, use_cache=False)
        models["llmscratch no cache fp32"] = ours
    identical = None
    if peers:
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            GPT2LMHeadModel = None
        if GPT2LMHeadModel is not None:
            from llmscratch.hf import save_hf_gpt2

            with tempfile.TemporaryDirectory() as d:
                save_hf_gpt2(base, d)
                hf = GPT2LMHeadModel.from_pretrained(d).to(device).eval()
            mask = torch.ones_like(idx)

            def hf_greedy(model):
                """transformers' own cached greedy decoding of `idx`, as a timed closure."""
                def run():
                    with torch.inference_mode():
                        return model.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                                              min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                              pad_token_id=0)
                return run

            # fp32, and bf16 weights: the row to set against "llmscratch KV cache bf16"
            for name, model in (("transformers generate fp32", hf),
                                ("transformers generate bf16", copy.deepcopy(hf).to(torch.bfloat16))):
                fns[name], models[name] = hf_greedy(model), model
            identical = torch.equal(fns["llmscratch KV cache fp32"](), fns["transformers generate fp32"]())
        if uncached:
            # The book's own decoding loop (ch04 `generate_text_simple`: the whole context
            # again for every token). Its packaged KV-cache GPT-2 (llms_from_scratch.kv_cache,
            # 1.0.19) fails on the second decoding step (its causal mask is sliced along the
            # wrong axis), so there is no cached book row.
            try:
                from llms_from_scratch.ch04 import generate_text_simple
            except ImportError:
                generate_text_simple = None
            if generate_text_simple is not None:
                torch.manual_seed(0)
                book = book_model(cfg).to(device).eval()
                fns["book no cache fp32"] = lambda: generate_text_simple(book, idx, new_tokens,
                                                                         cfg.context_length)
                models["book no cache fp32"] = book
    fns = {name: _recorded(fn, record_run(models[name])) for name, fn in fns.items()}
    secs = interleave(fns, rounds)
    ref = secs.get("transformers generate fp32")
    rows = []
    for name, s in secs.items():
        row = {"shape": f"{preset} batch {batch_size}", "impl": name,
               "tokens_per_s": batch_size * new_tokens / s, "ran": _ran(fns[name])}
        if name.startswith("llmscratch"):
            row["kernels"] = kernels if name in references or not references else False
        if name in references:
            row["vs_reference"] = secs[references[name]] / s
            row["path"] = kernel_path(models[name])
        if ref:
            row["vs_transformers"] = ref / s
        rows.append(row)
    return rows, identical


def _ran(fn) -> dict:
    """What `fn`'s last call ran (see `record_run`), without the bookkeeping key."""
    return {k: v for k, v in fn.ran.items() if k != "_seen"}


def print_rows(rows: list[dict], title: str) -> None:
    """A plain aligned table of benchmark rows."""
    print(f"\n{title}")
    for r in rows:
        extra = []
        for key, fmt in (("tflops", "{:.3f} TFLOP/s"), ("mfu_vs_fp32_peak", "MFU(fp32 peak) {:.0%}"),
                         ("mfu_vs_bf16_peak", "MFU(bf16 peak) {:.0%}"), ("vs_fastest_peer", "{:.2f}x fastest peer"),
                         ("vs_fastest_fp32_peer", "{:.2f}x fastest fp32 peer"),
                         ("vs_transformers", "{:.2f}x transformers"), ("vs_reference", "{:.2f}x no-kernels")):
            if key in r:
                extra.append(fmt.format(r[key]))
        print(f"  {r['shape']:22s} {r['impl']:32s} {r['tokens_per_s']:10.1f} tok/s   " + "   ".join(extra))


def print_paths(rows: list[dict]) -> None:
    """Which path each kernel row took, shape class by shape class (`kernels.kernel_path`)."""
    for r in rows:
        if "path" in r:
            print(f"  {r['impl']}: " + ("; ".join(f"{k}: {v}" for k, v in r["path"].items()) or "no kernel applies"))


def bench_tokenizers(text: str, vocab_size: int = 4096, peers: bool = True) -> list[dict]:
    """BPE training seconds (ours vs the Rust `tokenizers` trainer) and encoding MB/s
    (GPT-2's via `get_tokenizer`; tiktoken's own "gpt2" Encoding, built apart from ours; our
    trained BPE). Best of two runs each."""
    from llmscratch.tokenizer import BPETokenizer, get_tokenizer

    def best(fn, n=2):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    mb = len(text.encode("utf-8")) / 1e6
    rows = []
    ours = BPETokenizer()
    rows.append({"task": f"train BPE, vocab {vocab_size}", "impl": "llmscratch BPETokenizer (Python)",
                 "seconds": best(lambda: BPETokenizer().train(text, vocab_size))})
    ours.train(text, vocab_size)
    if peers:
        try:
            from tokenizers import Tokenizer, models, pre_tokenizers, trainers

            def rust_train():
                tok = Tokenizer(models.BPE())
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                              special_tokens=["<|endoftext|>"],
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
                tok.train_from_iterator(text.splitlines(keepends=True), trainer)

            rows.append({"task": f"train BPE, vocab {vocab_size}", "impl": "Rust tokenizers",
                         "seconds": best(rust_train)})
        except ImportError:
            pass
    from bench_tokenizer import offline_tiktoken_gpt2

    gpt2 = get_tokenizer("gpt2")
    raw = offline_tiktoken_gpt2()  # tiktoken's own "gpt2" Encoding, not the one ours builds
    for name, fn in (("get_tokenizer('gpt2')", lambda: gpt2.encode(text)),
                     ("raw tiktoken gpt2", lambda: raw.encode_ordinary(text)),
                     (f"llmscratch BPE {vocab_size} (Python)", lambda: ours.encode(text))):
        s = best(fn)
        rows.append({"task": "encode", "impl": name, "seconds": s, "mb_per_s": mb / s})
    return rows


def run(args) -> None:
    """`llmscratch bench`: the machine's matmul peak and memory bandwidth, then the
    sections in `args.what`, printed and written as JSON (`args.json`, else, for a full
    run, `benchmarks/results/bench_<sections>.json`, stamped by `results.write_result`).

    Args:
        args: the CLI's parsed flags (`what`, `rounds`, `quick`, `no_peers`, `device`,
            `json`, `kernels`).
    """
    from llmscratch.kernels import release_freed_memory

    # process-wide, so every implementation measured here runs with the same allocator
    reuse_freed_memory()
    kernels = getattr(args, "kernels", True)
    device = args.device if args.device != "auto" else "cpu"
    report: dict = {"threads": torch.get_num_threads(), "device": device, "kernels": kernels}
    how = {True: "with kernels where measured faster", "force": "with every applicable kernel (forced)",
           False: "without kernels"}[kernels]

    def save(report: dict) -> None:
        """Written after every section, so a section that fails keeps the ones before it.
        A full run is the record the README quotes: `benchmarks/results/bench_<sections>.json`."""
        if args.json or not args.quick:
            from results import write_result

            name = "bench_" + "_".join(w for w in ("train", "generate", "tokenizer", "memory") if w in args.what)
            from llmscratch.kernels.choice import decisions

            report["kernel_decisions"] = decisions()  # this machine's measured choices (choice.py)
            write_result(name + ("" if kernels else "_no_kernels"), report, args.json)

    peak32 = matmul_peak(torch.float32, device=device)
    peak16 = matmul_peak(torch.bfloat16, device=device)
    bw = memory_bandwidth(device=device)
    report["machine"] = {"matmul_fp32_gflops": peak32, "matmul_bf16_gflops": peak16, "copy_gb_s": bw}
    print(f"machine: {torch.get_num_threads()} threads on {device}; matmul fp32 {peak32:.0f} GFLOP/s, "
          f"bf16 {peak16:.0f} GFLOP/s; copy {bw:.1f} GB/s; our rows {how}")
    if "train" in args.what:
        shapes = [TrainShape("small", 8, 256), TrainShape("gpt2-124m", 1, 1024)]
        if args.quick:
            shapes = [TrainShape("tiny", 4, 128)]
        rows = bench_training(shapes, args.rounds, device, peers=not args.no_peers,
                              peak_fp32=peak32, peak_bf16=peak16, kernels=kernels)
        print_rows(rows, f"training step (forward + backward + AdamW), median of {args.rounds}")
        report["train"] = rows
        save(report)
        release_freed_memory()  # the memory rows below run children beside this process
    if "generate" in args.what:
        preset = "tiny" if args.quick else "gpt2-124m"
        n_new = 20 if args.quick else 200
        for bs in (1, 8):
            rows, same = bench_generation(preset, bs, 20, n_new, args.rounds, device,
                                          peers=not args.no_peers, uncached=bs == 1, kernels=kernels)
            print_rows(rows, f"generation, greedy, prompt 20, {n_new} new tokens, batch {bs}"
                       + ("" if same is None else f" (tokens identical to transformers: {same})"))
            report[f"generate_batch{bs}"] = rows
            print_paths(rows)
            save(report)
            release_freed_memory()
    if "tokenizer" in args.what:
        from llmscratch.data.corpora import load_text

        text = load_text("python-docs" if args.quick else "tinyshakespeare")[0].text
        rows = bench_tokenizers(text, 512 if args.quick else 4096, peers=not args.no_peers)
        print(f"\ntokenizers on {'python-docs' if args.quick else 'tinyshakespeare'} ({len(text) / 1e6:.2f} MB)")
        for r in rows:
            speed = f"{r['mb_per_s']:6.2f} MB/s" if "mb_per_s" in r else ""
            print(f"  {r['task']:22s} {r['impl']:34s} {r['seconds']:7.3f} s  {speed}")
        report["tokenizer"] = rows
        save(report)
    if "memory" in args.what:
        preset, B, T = ("tiny", 2, 128) if args.quick else ("gpt2-124m", 4, 1024)
        from peak_memory import bench_memory

        rows = bench_memory(preset, B, T, peers=not args.no_peers, kernels=kernels)
        print(f"\npeak RSS of a training step ({preset}, batch {B} x {T}), each in a fresh process")
        for r in rows:
            print(f"  {r['impl']:45s} {r['peak_rss_mb']:8.0f} MB   {r['tokens_per_s']:7.1f} tok/s")
        report["memory"] = rows
    save(report)
