"""Speed measurements: the machine's own limits, training throughput and generation speed.

Every figure is reported against what the hardware can do (measured matmul GFLOP/s), and
against peers on the same shapes in the same run when they are installed: `transformers`'
GPT2LMHeadModel, and the book's own package (`pip install --no-deps llms-from-scratch`; its
declared dependencies include TensorFlow, which none of its GPT code needs).
Implementations are interleaved round by round, so a burst of machine noise hits all of
them alike, and medians are reported. Peers are imported lazily: the package itself never
needs them.
"""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from .model import GPT, GPTConfig, fused_lm_loss


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


def _train_step(model: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                B: int, T: int, amp: torch.dtype | None, device: torch.device) -> Callable[[], None]:
    """A closure doing one forward (`loss_of(tokens)`, under autocast when `amp`) + backward
    + fused AdamW step of `model` on a fixed batch of random tokens."""
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

    return step


def ours_train_step(cfg: GPTConfig, B: int, T: int, amp: torch.dtype | None, device="cpu",
                    compile: bool = False, checkpointing: bool = False) -> tuple[Callable[[], None], float]:
    """A closure doing one forward + backward + fused AdamW step of our GPT, and its
    training FLOPs per token."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    model.gradient_checkpointing = checkpointing
    fwd = torch.compile(model) if compile else model

    def loss_of(x):  # what train.pretrain does per micro-batch
        return fused_lm_loss(fwd(x, return_hidden=True), model.lm_head.weight, x)

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


def book_train_step(cfg: GPTConfig, B: int, T: int, amp: torch.dtype | None, device="cpu",
                    fast: bool = False) -> Callable[[], None]:
    """The same step on the book's `GPTModel` (or its sdpa `GPTModelFast`), with its loss as
    the book computes it: full logits, then cross-entropy. Raises ImportError when the
    `llms-from-scratch` package is not installed."""
    from llms_from_scratch.ch04 import GPTModel, GPTModelFast

    device = torch.device(device)
    torch.manual_seed(0)
    model = (GPTModelFast if fast else GPTModel)(book_config(cfg)).to(device).train()

    def loss_of(x):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())

    return _train_step(model, loss_of, cfg.vocab_size, B, T, amp, device)


def bench_training(shapes: list[TrainShape], rounds: int = 3, device="cpu", peers: bool = True,
                   peak_fp32: float | None = None, peak_bf16: float | None = None) -> list[dict]:
    """Tokens/s and MFU of a training step for each shape, interleaved: ours and
    transformers', each in fp32 and under bf16 autocast, and the book's GPTModel (fp32) and
    GPTModelFast (fp32 and bf16 autocast). Missing peers are skipped."""
    rows = []
    for shape in shapes:
        cfg = GPTConfig.from_name(shape.preset, context_length=max(shape.seq_len, 1))
        B, T = shape.batch_size, shape.seq_len
        fns: dict[str, Callable[[], None]] = {}
        fns["llmscratch fp32"], flops_tok = ours_train_step(cfg, B, T, None, device)
        fns["llmscratch bf16-autocast"], _ = ours_train_step(cfg, B, T, torch.bfloat16, device)
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
                   "tflops": flops_tok * tps / 1e12}
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
                     uncached: bool = True) -> tuple[list[dict], bool | None]:
    """Greedy decoding tokens/s: ours with the KV cache (fp32 and bf16 weights), without it,
    and transformers' `generate` on the same weights.

    Returns:
        `(rows, identical)`, where `identical` says whether our fp32 greedy tokens equal
        transformers' (None when transformers is not installed).
    """
    import tempfile

    from .generate import generate

    device = torch.device(device)
    torch.manual_seed(0)
    cfg = GPTConfig.from_name(preset)
    ours = GPT(cfg).to(device).eval()
    ours_bf16 = GPT(cfg).to(device).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_bf16.to(torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len), device=device)
    fns: dict[str, Callable[[], object]] = {
        "llmscratch KV cache fp32": lambda: generate(ours, idx, new_tokens),
        "llmscratch KV cache bf16": lambda: generate(ours_bf16, idx, new_tokens),
    }
    if device.type == "cpu":
        from .quantize import quantize_int8

        ours_int8 = GPT(cfg).eval()
        ours_int8.load_state_dict(ours.state_dict())
        quantize_int8(ours_int8)
        fns["llmscratch KV cache int8"] = lambda: generate(ours_int8, idx, new_tokens)
    if uncached:
        fns["llmscratch no cache fp32"] = lambda: generate(ours, idx, new_tokens, use_cache=False)
    identical = None
    if peers:
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            GPT2LMHeadModel = None
        if GPT2LMHeadModel is not None:
            from .weights import save_hf_gpt2

            with tempfile.TemporaryDirectory() as d:
                save_hf_gpt2(ours, d)
                hf = GPT2LMHeadModel.from_pretrained(d).to(device).eval()
            mask = torch.ones_like(idx)

            def run_hf():
                with torch.inference_mode():
                    return hf.generate(idx, attention_mask=mask, max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                       pad_token_id=0)

            fns["transformers generate fp32"] = run_hf
            identical = torch.equal(fns["llmscratch KV cache fp32"](), run_hf())
        if uncached:
            # The book's own decoding loop (ch04 `generate_text_simple`: the whole context
            # again for every token). Its packaged KV-cache GPT-2 (llms_from_scratch.kv_cache,
            # 1.0.19) fails on the second decoding step (its causal mask is sliced along the
            # wrong axis), so there is no cached book row.
            try:
                from llms_from_scratch.ch04 import GPTModel as BookGPT
                from llms_from_scratch.ch04 import generate_text_simple
            except ImportError:
                BookGPT = None
            if BookGPT is not None:
                torch.manual_seed(0)
                book = BookGPT(book_config(cfg)).to(device).eval()
                fns["book no cache fp32"] = lambda: generate_text_simple(book, idx, new_tokens,
                                                                         cfg.context_length)
    secs = interleave(fns, rounds)
    ref = secs.get("transformers generate fp32")
    rows = []
    for name, s in secs.items():
        row = {"shape": f"{preset} batch {batch_size}", "impl": name,
               "tokens_per_s": batch_size * new_tokens / s}
        if ref:
            row["vs_transformers"] = ref / s
        rows.append(row)
    return rows, identical


def print_rows(rows: list[dict], title: str) -> None:
    """A plain aligned table of benchmark rows."""
    print(f"\n{title}")
    for r in rows:
        extra = []
        for key, fmt in (("tflops", "{:.3f} TFLOP/s"), ("mfu_vs_fp32_peak", "MFU(fp32 peak) {:.0%}"),
                         ("mfu_vs_bf16_peak", "MFU(bf16 peak) {:.0%}"), ("vs_fastest_peer", "{:.2f}x fastest peer"),
                         ("vs_fastest_fp32_peer", "{:.2f}x fastest fp32 peer"),
                         ("vs_transformers", "{:.2f}x transformers")):
            if key in r:
                extra.append(fmt.format(r[key]))
        print(f"  {r['shape']:22s} {r['impl']:32s} {r['tokens_per_s']:10.1f} tok/s   " + "   ".join(extra))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    On Linux this is `VmHWM` of the process's own address space: `ru_maxrss` would also
    count the parent's peak, which a child started with fork + exec inherits."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux (bytes on macOS)


def _rss_child(impl: str, preset: str, B: int, T: int, amp: str, checkpointing: bool) -> None:
    """Run inside a fresh process: two training steps, then print the peak RSS in MB."""
    from .utils import reuse_freed_memory

    reuse_freed_memory()  # as the CLI's training commands do

    dtype = torch.bfloat16 if amp == "bf16" else None
    cfg = GPTConfig.from_name(preset, context_length=max(T, 1))
    if impl == "llmscratch":
        step, _ = ours_train_step(cfg, B, T, dtype, checkpointing=checkpointing)
    else:
        step = hf_train_step(cfg, B, T, dtype)
    t0 = time.perf_counter()
    step()
    step()
    secs = (time.perf_counter() - t0) / 2
    print(f"RSS {peak_rss_mb():.1f} {B * T / secs:.1f}")


def peak_rss_train_step(impl: str, preset: str = "gpt2-124m", batch_size: int = 4, seq_len: int = 1024,
                        amp: str = "fp32", checkpointing: bool = False) -> tuple[float, float]:
    """Peak resident memory (MB) and tokens/s of a training step, measured in a fresh
    process so earlier allocations do not count. `impl` is "llmscratch" or "transformers"."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "llmscratch.bench", impl, preset, str(batch_size), str(seq_len), amp,
           "1" if checkpointing else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("RSS ")][-1]
    rss, tps = line.split()[1:]
    return float(rss), float(tps)


def bench_memory(preset: str = "gpt2-124m", batch_size: int = 4, seq_len: int = 1024,
                 peers: bool = True) -> list[dict]:
    """Peak RSS of a training step: ours fp32, ours with activation checkpointing, ours bf16
    autocast, and transformers fp32."""
    runs = [("llmscratch", "fp32", False), ("llmscratch", "fp32", True), ("llmscratch", "bf16", False)]
    if peers:
        runs.append(("transformers", "fp32", False))
    rows = []
    for impl, amp, ckpt in runs:
        try:
            rss, tps = peak_rss_train_step(impl, preset, batch_size, seq_len, amp, ckpt)
        except Exception as e:  # a missing peer or an out-of-memory child: report, go on
            print(f"  {impl} {amp}: failed ({e})")
            continue
        name = f"{impl} {amp}" + (" + activation checkpointing" if ckpt else "")
        rows.append({"shape": f"{preset} {batch_size}x{seq_len}", "impl": name, "peak_rss_mb": rss,
                     "tokens_per_s": tps})
    return rows


if __name__ == "__main__":  # the child process of peak_rss_train_step
    import sys

    _impl, _preset, _b, _t, _amp, _ckpt = sys.argv[1:7]
    _rss_child(_impl, _preset, int(_b), int(_t), _amp, _ckpt == "1")


def bench_tokenizers(text: str, vocab_size: int = 4096, peers: bool = True) -> list[dict]:
    """BPE training seconds (ours vs the Rust `tokenizers` trainer) and encoding MB/s
    (GPT-2's via `get_tokenizer`, the raw tiktoken encoding underneath, our trained BPE).
    Best of two runs each."""
    from .tokenizer import BPETokenizer, get_tokenizer

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
    gpt2 = get_tokenizer("gpt2")
    for name, fn in (("get_tokenizer('gpt2')", lambda: gpt2.encode(text)),
                     ("raw tiktoken gpt2", lambda: gpt2.encoding.encode_ordinary(text)),
                     (f"llmscratch BPE {vocab_size} (Python)", lambda: ours.encode(text))):
        s = best(fn)
        rows.append({"task": "encode", "impl": name, "seconds": s, "mb_per_s": mb / s})
    return rows
