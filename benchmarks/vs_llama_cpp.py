"""llama.cpp as the CPU speed bar: llmscratch `generate` against llama.cpp (through
llama-cpp-python) on the same weights, batch 1, the same thread count, in one process.

llama-bench's two figures, for each model and precision:
- pp512: prompt processing, tokens/s of one 512-token forward pass (ours: `generate` with
  one new token, i.e. the prefill; llama.cpp: `Llama.eval` of the 512 tokens);
- tg128: generation, tokens/s of 128 greedy tokens after a one-token prompt (ours:
  `generate`, KV cache, kernels as the CLI applies them; llama.cpp: `Llama.generate` with
  its greedy sampler).
Precisions at matching weight sizes: our fp32 / bf16 / int8 (weight-only, bf16
activations) against llama.cpp's f32 / f16 and bf16 / q8_0. Every implementation runs round
by round interleaved with the others (`harness.interleave`), medians reported.

Models: the gpt2-124m shape and a Llama-style model of the same width and depth (RoPE,
RMSNorm, SwiGLU, GQA 12/4), random weights, GPT-2's tokenizer; each exported with
`llmscratch.checkpoints.gguf.write_gguf`.

q8_0 quality (not speed): a small model trained here on the embedded python-docs corpus
(or `--quality-run RUN`), exported at f32, f16 and q8_0; on held-out text, each file's
perplexity in llama.cpp, ours in fp32, and how often each file's top-1 token equals f32's.

    python benchmarks/vs_llama_cpp.py                  # writes benchmarks/results/vs_llama_cpp.json
    python benchmarks/vs_llama_cpp.py --quick --rounds 1 --json /tmp/v.json
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import interleave  # benchmarks/harness.py
from llmscratch.checkpoints.gguf import write_gguf
from llmscratch.decoding.generate import generate
from llmscratch.kernels import apply_kernels
from llmscratch.kernels.quantize import quantize_int8
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import get_tokenizer
from results import write_result  # benchmarks/results.py

LLAMA_STYLE = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, qkv_bias=False, n_layer=12,
                   n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048, context_length=1024,
                   tie_weights=False, norm_eps=1e-5, rope_theta=500000.0)
PAIRS = [("fp32", "f32"), ("bf16", "f16"), ("bf16", "bf16"), ("int8", "q8_0")]
"""(ours, llama.cpp) precisions compared; `--no-bf16-gguf` drops llama.cpp's bf16 (f16 stands in)"""


def _ours(base: GPT, dtype: str) -> GPT:
    model = GPT(base.config).eval()
    model.load_state_dict(base.state_dict())
    apply_kernels(model)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    elif dtype == "int8":
        quantize_int8(model)
    return model


def _llama(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def _logged(name: str, fn):
    def call():
        t0 = time.perf_counter()
        fn()
        print(f"  {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    return call


def bench_model(label: str, cfg: GPTConfig, folder: Path, rounds: int, pp: int, tg: int, threads: int,
                no_bf16: bool = False) -> list[dict]:
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    tok = get_tokenizer("gpt2")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, pp), generator=g)
    one = prompt[:, :1]
    fns, llms = {}, {}
    pairs = [p for p in PAIRS if p[1] != "bf16"] if no_bf16 else PAIRS
    for ours_dt, cpp_dt in pairs:
        name = f"llmscratch {ours_dt}"
        if f"{name} pp{pp}" not in fns:
            m = _ours(base, ours_dt)
            fns[f"{name} pp{pp}"] = (lambda m: lambda: generate(m, prompt, 1))(m)
            fns[f"{name} tg{tg}"] = (lambda m: lambda: generate(m, one, tg))(m)
        path = write_gguf(base, tok, folder / f"{label}-{cpp_dt}.gguf", dtype=cpp_dt, force=True)
        llm = llms[cpp_dt] = _llama(path, cfg.context_length, threads)

        def cpp_pp(llm=llm):
            llm.reset()
            llm.eval(prompt[0].tolist())

        def cpp_tg(llm=llm):
            llm.reset()
            it = llm.generate(one[0].tolist(), temp=0.0, top_k=1, reset=True)
            for _ in range(tg):
                next(it)

        fns[f"llama.cpp {cpp_dt} pp{pp}"] = cpp_pp
        fns[f"llama.cpp {cpp_dt} tg{tg}"] = cpp_tg
    seconds = interleave({k: _logged(k, f) for k, f in fns.items()}, rounds)
    rows = []
    for name, s in seconds.items():
        n = pp if name.endswith(f"pp{pp}") else tg
        rows.append({"model": label, "name": name, "seconds": round(s, 4), "tokens_per_s": round(n / s, 1)})
    for ours_dt, cpp_dt in pairs:
        for test in (f"pp{pp}", f"tg{tg}"):
            a = seconds[f"llmscratch {ours_dt} {test}"]
            b = seconds[f"llama.cpp {cpp_dt} {test}"]
            rows.append({"model": label, "name": f"ratio llmscratch {ours_dt} / llama.cpp {cpp_dt} {test}",
                         "speed_ratio": round(b / a, 3)})
    return rows


def _train_quality_run(out: Path) -> Path:
    from llmscratch.cli.main import main

    code = main(["pretrain", "--data", "python-docs", "--model", "mini", "--tokenizer", "bpe:2048",
                 "--context-length", "128", "--batch-size", "8", "--max-steps", "300", "--eval-every", "300",
                 "--precision", "fp32", "--no-progress", "--seed", "0", "--out", str(out)])
    if code:
        raise SystemExit("training the quality model failed")
    return out


def q8_quality(run: Path, folder: Path, threads: int, chunks: int) -> dict:
    """Perplexity on held-out text and top-1 agreement with f32, per GGUF precision."""
    from llmscratch.checkpoints.run import load_model
    from llmscratch.data.corpora import python_docs_text
    from llmscratch.decoding.export import ExportConfig, export

    model, tok = load_model(str(run))
    T = model.config.context_length
    text = python_docs_text()
    ids = tok.encode_ordinary(text[-60_000:])  # the corpus's tail: a run's validation split
    windows = [ids[i * T:(i + 1) * T] for i in range(min(chunks, len(ids) // T))]
    out = {"run": str(run), "model": model.config.to_dict(), "tokenizer_vocab": tok.vocab_size,
           "windows": len(windows), "tokens_per_window": T}

    def nll_and_top1(logits: np.ndarray, w: list[int]):
        x = logits[:-1].astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
        return -logp[np.arange(len(w) - 1), w[1:]].sum(), logits[:-1].argmax(-1)

    ours_nll, ours_top = 0.0, []
    with torch.no_grad():
        for w in windows:
            nll, top = nll_and_top1(model(torch.tensor([w]))[0].numpy(), w)
            ours_nll += nll
            ours_top.append(top)
    n = sum(len(w) - 1 for w in windows)
    out["llmscratch fp32 perplexity"] = round(math.exp(ours_nll / n), 4)
    tops = {}
    for dt in ("f32", "f16", "q8_0"):
        path, _ = export(ExportConfig(model=str(run), out=str(folder / f"quality-{dt}.gguf"), dtype=dt,
                                      force=True, modelfile=False))
        llm = _llama(path, T, threads, logits_all=True)
        total, tops[dt] = 0.0, []
        for w in windows:
            llm.reset()
            llm.eval(w)
            nll, top = nll_and_top1(np.asarray(llm.scores[:len(w)]), w)
            total += nll
            tops[dt].append(top)
        out[f"llama.cpp {dt} perplexity"] = round(math.exp(total / n), 4)
    for dt in ("f32", "f16", "q8_0"):
        same_f32 = np.mean(np.concatenate(tops[dt]) == np.concatenate(tops["f32"]))
        same_ours = np.mean(np.concatenate(tops[dt]) == np.concatenate(ours_top))
        out[f"llama.cpp {dt} top-1 = llama.cpp f32"] = round(float(same_f32), 4)
        out[f"llama.cpp {dt} top-1 = llmscratch fp32"] = round(float(same_ours), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pp", type=int, default=512, help="prompt tokens (llama-bench's pp512)")
    p.add_argument("--tg", type=int, default=128, help="generated tokens (llama-bench's tg128)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--quality-run", help="a trained run folder for the q8_0 quality figures "
                                         "(default: train a small one here, a few minutes)")
    p.add_argument("--quality-windows", type=int, default=40)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-bf16-gguf", action="store_true", help="skip llama.cpp's bf16 file (f16 stands in)")
    p.add_argument("--threads", type=int, help="threads for both (default: torch's)")
    p.add_argument("--json", help="write here instead of benchmarks/results/vs_llama_cpp.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()
    models = {"gpt2-124m": GPTConfig.from_name("gpt2-124m"), "llama-style-124m": GPTConfig(vocab_size=50257, **LLAMA_STYLE)}
    if args.quick:
        models = {"gpt2-tiny": GPTConfig.from_name("tiny", vocab_size=50257, context_length=256),
                  "llama-style-tiny": GPTConfig(**{**LLAMA_STYLE, "n_layer": 2, "n_embd": 64, "n_head": 4,
                                                   "n_kv_head": 2, "intermediate_size": 192,
                                                   "context_length": 256}, vocab_size=50257)}
    rows, quality = [], None
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        for label, cfg in models.items():
            rows += bench_model(label, cfg, folder, args.rounds, args.pp, args.tg, threads, args.no_bf16_gguf)
            for r in rows:
                if r["model"] == label:
                    print(r)
        if not args.no_quality:
            run = Path(args.quality_run) if args.quality_run else _train_quality_run(folder / "quality-run")
            quality = q8_quality(run, folder, threads, args.quality_windows)
            print(quality)
    import llama_cpp

    write_result("vs_llama_cpp", {
        "args": vars(args), "threads": threads, "batch_size": 1,
        "llama_cpp_python": llama_cpp.__version__,
        "under_load": {"loadavg_at_start": [round(x, 2) for x in load], "loadavg_at_end":
                       [round(x, 2) for x in os.getloadavg()],
                       "note": "taken on a shared 2-core machine while other sessions ran; ratios come "
                               "from interleaved rounds in one process, absolute tokens/s are noisy"},
        "rows": rows, "q8_0_quality": quality}, args.json)


if __name__ == "__main__":
    main()
