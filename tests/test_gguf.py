"""`llmscratch export --format gguf`: the file's tensors and keys (read back with the gguf
package's own reader), the Ollama Modelfile, the one-line errors, and, where llama-cpp-python
is installed, llama.cpp itself loading each file and decoding what we decode.

Families: GPT-2 style (our BPE, GPT-2's own tokenizer), Llama style (GQA, Llama 3 rope
scaling, a tokenizer.json with Llama 3's split regex), Qwen3 style (QK-norm, Qwen2's regex),
and a tiny trained run folder. Tolerances (llama.cpp against our fp32 reference, logits
of models whose logits spread over about +-20): f32 1e-3 x the logits' range, f16 2e-2 x.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscratch.checkpoints.gguf import write_gguf
from llmscratch.checkpoints.gguf_vocab import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN
from llmscratch.checkpoints.run import load_model, save_model
from llmscratch.cli.main import main
from llmscratch.decoding.export import ExportConfig, export, jinja_template, translate_jinja
from llmscratch.decoding.prompts import TEMPLATES, format_chat
from llmscratch.errors import UserError
from llmscratch.hf import save_hf
from llmscratch.models.attention import rope_frequencies
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.tokenizer import BPETokenizer, HFTokenizer, get_tokenizer

gguf = pytest.importorskip("gguf")

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)
TRICKY = ["Hello world", "  leading and   inner   spaces\t\ttabs\n\n\nnewlines  ",
          "naïve café — 日本語 😀 ﬁ", "def f(x):\n    return x**2  # sq", "<|endoftext|>after an end<|endoftext|>",
          "1234567 numbers 3.14159", "trailing space "]


def _sharpen(model: GPT) -> GPT:
    """Spread the logits (+-20 rather than +-0.5) and sharpen attention, so greedy picks are
    decided by margins far above float error and every position's attention (where rotary
    layouts live) moves the logits: a fresh init's near-ties would test rounding, not the
    export, and its residual stream barely feels attention."""
    with torch.no_grad():
        model.ln_f.weight.mul_(40)
        for block in model.h:
            if model.config.qk_norm:
                block.attn.q_norm.weight.mul_(4)
                block.attn.k_norm.weight.mul_(4)
            else:
                block.attn.c_attn.weight.mul_(4)
            block.attn.c_proj.weight.mul_(8)
    return model.eval()


def _hf_tokenizer_folder(folder: Path, text: str, pattern: str, specials: list[str], eos: str,
                         template: str | None = None) -> Path:
    """A byte-level BPE tokenizer.json trained here, splitting with `pattern` as Llama 3's
    and Qwen's files do (Split, then ByteLevel without its own regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


QWEN_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, docs_text):
    """name -> a model folder of each family, each with its tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    text = docs_text[:40_000]
    out = {}
    torch.manual_seed(0)
    bpe = BPETokenizer().train(text, 400)
    model = _sharpen(GPT(GPTConfig.from_name("tiny", vocab_size=bpe.vocab_size, context_length=96)))
    out["gpt2-bpe"] = save_model(model, root / "gpt2-bpe", bpe, extra={"template": "alpaca"})
    model = _sharpen(GPT(GPTConfig.from_name("tiny", context_length=96, tie_weights=False)))
    out["gpt2-gpt2"] = save_model(model, root / "gpt2-gpt2", get_tokenizer("gpt2"))
    llama = _hf_tokenizer_folder(root / "llama", text, LLAMA3_SPLIT_PATTERN,
                                 ["<|begin_of_text|>", "<|eot_id|>"], "<|eot_id|>")
    cfg = GPTConfig.from_name("llama-tiny", vocab_size=HFTokenizer.from_folder(llama).vocab_size + 3,
                              context_length=96, n_head=4, n_kv_head=2, rope_theta=500000.0,
                              rope_scaling=LLAMA3_SCALING, tie_weights=False)
    save_hf(_sharpen(GPT(cfg)), llama)
    out["llama"] = llama
    qwen = _hf_tokenizer_folder(root / "qwen3", text, QWEN2_SPLIT_PATTERN,
                                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", QWEN_TEMPLATE)
    cfg = GPTConfig.from_name("llama-tiny", vocab_size=HFTokenizer.from_folder(qwen).vocab_size,
                              context_length=96, qk_norm=True, head_size=32, tie_weights=True, norm_eps=1e-6)
    save_hf(_sharpen(GPT(cfg)), qwen)
    out["qwen3"] = qwen
    return out


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """(name, dtype) -> the exported .gguf (made once, on first use)."""
    root = tmp_path_factory.mktemp("gguf-out")
    made = {}

    def get(name: str, dtype: str = "f32") -> Path:
        if (name, dtype) not in made:
            made[name, dtype] = export(ExportConfig(model=str(folders[name]), out=str(root / f"{name}-{dtype}.gguf"),
                                                    dtype=dtype))[0]
        return made[name, dtype]

    return get


def _kv(reader, key):
    field = reader.fields[key]
    return field.contents()


# --------------------------------------------------------------------------- the file itself


EXPECTED = {
    "gpt2-bpe": ("gpt2", {"token_embd", "position_embd", "output_norm"},
                 {"attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"}),
    "gpt2-gpt2": ("gpt2", {"token_embd", "position_embd", "output_norm", "output"},
                  {"attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"}),
    "llama": ("llama", {"token_embd", "rope_freqs", "output_norm", "output"},
              {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}),
    "qwen3": ("qwen3", {"token_embd", "output_norm"},
              {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output", "ffn_norm",
               "ffn_gate", "ffn_up", "ffn_down"}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tensors_and_keys_of_each_family(name, folders, exported):
    arch, top, per_block = EXPECTED[name]
    model, tok = load_model(str(folders[name]))
    c = model.config
    r = gguf.GGUFReader(str(exported(name)))
    assert _kv(r, "general.architecture") == arch
    names = {t.name.removesuffix(".weight").removesuffix(".bias") for t in r.tensors}
    assert names == top | {f"blk.{i}.{p}" for i in range(c.n_layer) for p in per_block}
    assert _kv(r, f"{arch}.block_count") == c.n_layer
    assert _kv(r, f"{arch}.context_length") == c.context_length
    assert _kv(r, f"{arch}.attention.head_count") == c.n_head
    assert _kv(r, f"{arch}.attention.head_count_kv") == c.kv_heads
    assert _kv(r, f"{arch}.feed_forward_length") == c.mlp_width
    tokens = _kv(r, "tokenizer.ggml.tokens")
    assert len(tokens) == c.vocab_size
    assert _kv(r, "tokenizer.ggml.model") == "gpt2"
    assert _kv(r, "tokenizer.ggml.pre") == {"llama": "llama-bpe", "qwen3": "qwen2"}.get(name, "gpt-2")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # GGUF lists ne0 (columns) first
    assert shapes["token_embd.weight"] == (c.n_embd, c.vocab_size)
    if arch != "gpt2":
        assert shapes["blk.0.attn_k.weight"] == (c.n_embd, c.kv_heads * c.head_dim)
        assert _kv(r, f"{arch}.rope.freq_base") == pytest.approx(c.rope_theta)
        assert _kv(r, f"{arch}.attention.key_length") == c.head_dim
    if name == "qwen3":
        assert shapes["blk.0.attn_q_norm.weight"] == (c.head_dim,)
        assert _kv(r, "tokenizer.chat_template") == QWEN_TEMPLATE
    if name == "gpt2-bpe":
        assert tokens[tok.eot_id] == "<|endoftext|>"
        assert _kv(r, "tokenizer.ggml.eos_token_id") == tok.eot_id
        assert len(_kv(r, "tokenizer.ggml.merges")) == len(tok.merges)
        assert "### Instruction:" in _kv(r, "tokenizer.chat_template")


def test_llama3_rope_scaling_is_the_rope_freqs_tensor(folders, exported):
    model, _ = load_model(str(folders["llama"]))
    c = model.config
    r = gguf.GGUFReader(str(exported("llama")))
    freqs = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    want = rope_frequencies(c.head_dim, c.rope_theta) / rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    assert np.allclose(np.asarray(freqs.data), want.numpy())
    assert want.max() == pytest.approx(8.0) and want.min() == pytest.approx(1.0)  # the scaling is in there


def test_dtypes_store_matrices_at_that_precision_and_norms_in_f32(folders, exported):
    model, _ = load_model(str(folders["llama"]))
    types = {}
    for dtype in ("f16", "bf16", "q8_0"):
        r = gguf.GGUFReader(str(exported("llama", dtype)))
        types[dtype] = {t.name: t.tensor_type.name for t in r.tensors}
        assert types[dtype]["blk.0.attn_norm.weight"] == "F32"
        assert types[dtype]["rope_freqs.weight"] == "F32"
        if dtype == "q8_0":
            ffn_up = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
            back = gguf.quants.dequantize(ffn_up.data, ffn_up.tensor_type)
            up = model.h[1].mlp.c_fc.weight.detach().chunk(2)[1].numpy()
            assert np.abs(back - up).max() <= np.abs(up).max() / 127 + 1e-6  # an 8-bit block's step
    assert types["f16"]["blk.0.attn_q.weight"] == "F16"
    assert types["bf16"]["blk.0.attn_q.weight"] == "BF16"
    assert types["q8_0"]["blk.0.attn_q.weight"] == "Q8_0"


# --------------------------------------------------------------------------- templates and the Modelfile


CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a {{colour}}."}],
]


@pytest.mark.parametrize("name", ["alpaca", "phi3", "plain"])
def test_our_templates_as_jinja_render_what_format_chat_lays_out(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja = env.from_string(jinja_template(TEMPLATES[name]))
    for conv in CONVERSATIONS:
        assert jinja.render(messages=conv, add_generation_prompt=True) == format_chat(conv, name)


def render_go(template: str, system: str, messages: list[dict]) -> str:
    """Ollama's rendering of the Go-template subset our Modelfiles use (`if`/`else if`/`else`/
    `end`, `range .Messages`, `eq .Role "x"`, `.System`, `.Content`, string literals), with
    Ollama's values: `.System` the system messages joined, `.Messages` every message."""
    import re

    tokens = re.split(r"({{-?\s*.*?\s*-?}})", template)

    def parse(i, stop):
        nodes = []
        while i < len(tokens):
            tok = tokens[i]
            if not tok.startswith("{{"):
                nodes.append(("text", tok))
                i += 1
                continue
            body = tok.strip("{}-").strip()
            if body in stop or body.startswith("else"):
                return nodes, i
            if body.startswith(("if ", "range ")):
                branches, j = [], i
                cond = body
                while True:
                    inner, j = parse(j + 1, ("end",))
                    branches.append((cond, inner))
                    end = tokens[j].strip("{}-").strip()
                    if end == "end":
                        break
                    cond = "if " + end[len("else if "):] if end.startswith("else if ") else "else"
                nodes.append(("block", branches))
                i = j + 1
                continue
            nodes.append(("expr", body))
            i += 1
        return nodes, i

    def value(expr, ctx):
        if expr.startswith('"'):
            return json.loads(expr)
        if expr.startswith("eq "):
            a, b = re.match(r'eq (\S+) (".*")', expr).groups()
            return value(a, ctx) == value(b, ctx)
        return ctx[expr.lstrip(".")]

    def run(nodes, ctx):
        out = []
        for kind, node in nodes:
            if kind == "text":
                out.append(node)
            elif kind == "expr":
                out.append(value(node, ctx))
            else:
                for cond, inner in node:
                    if cond.startswith("range "):
                        for m in ctx["Messages"]:
                            out.append(run(inner, {**ctx, "Role": m["role"], "Content": m["content"]}))
                        break
                    if cond == "else" or value(cond[3:], ctx):
                        out.append(run(inner, ctx))
                        break
        return "".join(out)

    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or system
    return run(parse(0, ())[0], {"System": sys_text, "Messages": messages})


def _modelfile_parts(text: str) -> tuple[str, str]:
    import re

    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM "(.*)"$', text, re.M)
    return template, system.group(1) if system else ""


@pytest.mark.parametrize("name", ["alpaca", "phi3", "plain"])
def test_our_templates_in_go_render_what_format_chat_lays_out(name):
    from llmscratch.decoding.export import go_template

    go, system = go_template(TEMPLATES[name])
    for conv in CONVERSATIONS:
        assert render_go(go, system, conv) == format_chat(conv, name)


def test_modelfile_of_an_alpaca_run(folders, exported):
    path = exported("gpt2-bpe")
    text = path.with_name(path.stem + ".Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in text
    assert 'SYSTEM "Below is an instruction' in text
    assert 'PARAMETER stop "### Instruction:"' in text and 'PARAMETER stop "<|endoftext|>"' in text
    assert "PARAMETER temperature 0.8" in text and "PARAMETER top_k 40" in text
    assert '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n' in text


def test_a_models_own_template_translated_to_ollamas(folders, exported):
    path = exported("qwen3")
    text = path.with_name(path.stem + ".Modelfile").read_text()
    assert ('{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n') in text
    assert text.count("{{ range .Messages }}") == 1 and '<|im_start|>assistant\n"""' in text
    template, system = _modelfile_parts(text)
    tok = HFTokenizer.from_folder(folders["qwen3"])
    for conv in CONVERSATIONS:
        assert render_go(template, system, conv) == tok.render_chat(conv, add_generation_prompt=True)
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_a_template_that_rewrites_turns_is_not_translated():
    def render(messages, add_generation_prompt):  # drops every reply but the last, as Qwen3 drops thinking
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        return "".join(f"[{m['role']}]{m['content'] if m['role'] != 'assistant' or i == last else ''}"
                       for i, m in enumerate(messages)) + ("[assistant]" if add_generation_prompt else "")

    assert translate_jinja(render) is None
    good = translate_jinja(lambda ms, gen: "".join(f"<{m['role']}>{m['content']}</s>" for m in ms) + ("<assistant>" if gen else ""))
    assert good is not None and good[1] == ["</s>", "<user>"]


# --------------------------------------------------------------------------- one-line errors


def _cli(*args, capsys):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_inputs_are_one_line_errors(folders, tmp_path, capsys, docs_text):
    out = tmp_path / "m.gguf"
    cases = []
    cases.append((["--model", str(tmp_path / "nope"), "--out", str(out)], "no such folder"))
    cases.append((["--model", str(folders["gpt2-bpe"]), "--out", str(tmp_path / "m.bin")], "must end in .gguf"))
    # an encoder
    from llmscratch.models.bert import Bert, BertConfig
    from llmscratch.tokenizer import WordPieceTokenizer

    wp = WordPieceTokenizer.from_corpus([docs_text[:5000]], 200)
    save_model(Bert(BertConfig.from_name("bert-tiny", vocab_size=wp.vocab_size)), tmp_path / "bert", wp)
    cases.append((["--model", str(tmp_path / "bert"), "--out", str(out)], "an encoder"))
    # a family llama.cpp has no architecture for: RoPE with LayerNorm and GELU
    bpe = BPETokenizer().train(docs_text[:5000], 300)
    odd = GPT(GPTConfig.from_name("tiny", vocab_size=bpe.vocab_size, position="rope"))
    save_model(odd, tmp_path / "odd", bpe)
    cases.append((["--model", str(tmp_path / "odd"), "--out", str(out)], "no llama.cpp architecture"))
    # a tokenizer llama.cpp cannot represent: our BPE with its own split regex; a word-level one
    custom = BPETokenizer(pattern=r"\S+|\s+").train(docs_text[:5000], 300)
    save_model(GPT(GPTConfig.from_name("tiny", vocab_size=custom.vocab_size)), tmp_path / "regex", custom)
    cases.append((["--model", str(tmp_path / "regex"), "--out", str(out)], "cannot be represented"))
    from llmscratch.tokenizer import WordTokenizer

    word = WordTokenizer().train(docs_text[:5000], 200)
    save_model(GPT(GPTConfig.from_name("tiny", vocab_size=word.vocab_size)), tmp_path / "word", word)
    cases.append((["--model", str(tmp_path / "word"), "--out", str(out)], "cannot be represented in GGUF"))
    # a run folder without its tokenizer
    save_model(GPT(GPTConfig.from_name("tiny", vocab_size=300)), tmp_path / "notok")
    cases.append((["--model", str(tmp_path / "notok"), "--out", str(out)], "no tokenizer.json"))
    # a Hugging Face Llama folder without its tokenizer
    save_hf(GPT(GPTConfig.from_name("llama-tiny", vocab_size=300)), tmp_path / "hf-notok")
    cases.append((["--model", str(tmp_path / "hf-notok"), "--out", str(out)], "no tokenizer.json"))
    for args, expected in cases:
        code, _, err = _cli("export", *args, capsys=capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, (args, err)
        assert not out.exists() and not list(tmp_path.glob(".m.gguf.*"))
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", str(folders["gpt2-bpe"]), "--out", str(out), "--dtype", "q4"])
    assert exit_.value.code == 2 and "invalid choice: 'q4'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown GGUF dtype 'q4_k'"):  # the library's own check
        write_gguf(*load_model(str(folders["gpt2-bpe"])), out, dtype="q4_k")


def test_an_existing_file_is_refused_unless_forced(folders, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, _, err = _cli("export", "--model", str(folders["gpt2-bpe"]), "--out", str(out), capsys=capsys)
    assert code == 2 and "already exists (use --force" in err and out.read_bytes() == b"keep me"
    code, stdout, _ = _cli("export", "--model", str(folders["gpt2-bpe"]), "--out", str(out), "--force", capsys=capsys)
    assert code == 0 and f"wrote {out}" in stdout and out.read_bytes()[:4] == b"GGUF"


def test_a_failed_write_leaves_no_file(folders, tmp_path, monkeypatch):
    """Disk full in the middle of the tensors: a one-line error, and neither the .gguf nor its
    temporary is left."""
    model, tok = load_model(str(folders["gpt2-bpe"]))
    real = gguf.GGUFWriter.write_tensors_to_file

    def full(self, *a, **k):
        real(self, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(UserError, match="No space left on device"):
        write_gguf(model, tok, tmp_path / "full.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- llama.cpp itself

TOLERANCE = {"f32": 1e-3, "f16": 2e-2}
"""max |llama.cpp logit - ours| as a fraction of the range of our logits at that position"""
NEW_TOKENS = 40


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                               "llama-cpp-python; .ci/run installs it)")


def _load_in_llama_cpp(path: Path, n_ctx: int, dtype: str = "f16"):
    """llama.cpp on `path`; for an f32 file with an f32 KV cache too (its default is f16)."""
    llama_cpp = _llama_cpp()
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if dtype == "f32" else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True,
                           verbose=False, **cache)


def _compare(folder: Path, path: Path, dtype: str, prompt: str) -> None:
    """llama.cpp's logits on our greedy continuation agree with ours within TOLERANCE at every
    position, and its argmax is our token at every step: its own greedy decoding would write
    the same NEW_TOKENS tokens."""
    from llmscratch.decoding.generate import generate

    model, tok = load_model(str(folder))
    ids = tok.encode(prompt)
    seq = generate(model, torch.tensor([ids]), NEW_TOKENS)[0]
    with torch.no_grad():
        ours = model(seq[None])[0].numpy()
    llm = _load_in_llama_cpp(path, model.config.context_length, dtype)
    try:
        _check_llama_cpp(llm, ids, seq, ours, dtype)
    finally:
        llm.close()


def _check_llama_cpp(llm, ids: list[int], seq: torch.Tensor, ours: np.ndarray, dtype: str) -> None:
    llm.reset()
    llm.eval(seq.tolist())
    theirs = np.asarray(llm.scores[:len(seq)])
    span = ours.max(-1) - ours.min(-1)
    worst = (np.abs(theirs - ours).max(-1) / span).max()
    assert worst <= TOLERANCE[dtype], f"logits differ by {worst:.2e} of their range"
    picks = theirs[len(ids) - 1:-1].argmax(-1)
    assert picks.tolist() == seq[len(ids):].tolist()
    # and free-running: llama.cpp's own sampler, greedy
    llm.reset()
    out = llm.generate(ids, temp=0.0, top_k=1, reset=True)
    got = [next(out) for _ in range(NEW_TOKENS)]
    assert got == seq[len(ids):].tolist()


def _tokenizes_as_we_do(name: str, folder: Path, path: Path) -> None:
    """llama.cpp's tokenizer gives our ids on tricky text, with and without special tokens,
    and decodes them back byte for byte."""
    llm = _load_in_llama_cpp(path, 96)
    _, tok = load_model(str(folder))
    specials = list(tok.special_tokens)
    try:
        for text in TRICKY + [f"{s} between {s}" for s in specials]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), (name, text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text), (name, text)
            ids = tok.encode(text)
            assert llm.detokenize(ids, special=True) == text.encode(), (name, text)
    finally:
        llm.close()


def test_llama_cpp_runs_every_export_as_we_do(folders, exported, corpus_file, tmp_path):
    """llama.cpp itself loads each family's file (and a trained run folder's) at f32 and
    f16 and decodes what we decode; its tokenizer gives our ids. One test, so that a clone
    without llama-cpp-python (a 20-40 minute build) skips once, naming the package."""
    _llama_cpp()
    for name in EXPECTED:
        for dtype in ("f32", "f16"):
            try:
                _compare(folders[name], exported(name, dtype), dtype, "The with statement")
            except AssertionError as e:
                raise AssertionError(f"{name} {dtype}: {e}") from None
        _tokenizes_as_we_do(name, folders[name], exported(name))
    trained = tmp_path / "trained"
    code = main(["pretrain", "--data", str(corpus_file), "--model", "tiny", "--tokenizer", "bpe:320",
                 "--context-length", "64", "--batch-size", "8", "--max-steps", "40", "--eval-every", "40",
                 "--warmup-steps", "5", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--seed", "7",
                 "--out", str(trained)])
    assert code == 0
    for dtype in ("f32", "f16"):
        path, _ = export(ExportConfig(model=str(trained), out=str(tmp_path / f"run-{dtype}.gguf"), dtype=dtype))
        try:
            _compare(trained, path, dtype, "The ")
        except AssertionError as e:
            raise AssertionError(f"trained run {dtype}: {e}") from None


def test_a_tokenizer_json_that_adds_bos_says_so_in_the_gguf(folders, tmp_path):
    """Llama 3's tokenizer.json prepends <|begin_of_text|> through its post-processor: the GGUF
    then asks llama.cpp to add BOS (add_bos_token) with that id; ours without one does not."""
    from llmscratch.checkpoints.gguf_vocab import gguf_vocab

    folder = folders["llama"]
    data = json.loads((folder / "tokenizer.json").read_text())
    assert gguf_vocab(HFTokenizer.from_folder(folder), 500).add_bos is False
    bos = "<|begin_of_text|>"
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {bos: {"id": bos, "ids": [data["added_tokens"][0]["id"]],
                                                       "tokens": [bos]}}}
    tok = HFTokenizer(data, eos_token="<|eot_id|>", bos_token=bos)
    vocab = gguf_vocab(tok, 500)
    assert vocab.add_bos is True and vocab.bos_id == tok.token_to_id(bos)
    assert len(vocab.tokens) == 500 and vocab.tokens[-1] == "[PAD499]"
