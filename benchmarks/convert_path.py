"""Convert's path through the code: which package files `llmscratch convert RUN OUT` enters,
and how often the path comes back to a file it already passed through. Two measures:

Source (`static_path`): a depth-first walk from the tree's `convert` function over every
package function it names, through imports, lazy ones included (the issue's "following
convert's argument through the code"). It cannot see a call through a table (`save_hf`
asking `HF_FAMILIES`), so a family module reached only that way is not counted there.

Run time (`child`): three tiny run folders (a random GPT-2-style `tiny` GPT, a `llama-tiny` and a `bert-tiny`
encoder, as `save_model` writes them) are converted to Hugging Face folders and back
through the CLI's `main`, with `sys.setprofile` recording every call of a function defined
in the package. Two counts per tree:

- files entered: the package files whose functions run inside `convert` (from the
  `convert` function down: the CLI's argument parsing, the same for every command, is
  left out), summed over the six conversions as one set;
- climbs back up: calls that enter a file already on the call chain above their caller
  (e.g. `hub -> checkpoint -> weights -> bert_hub -> checkpoint`): code calling back and
  forth between modules. Each distinct (caller file, callee file) pair counts once.

Every tree is measured in its own process with `PYTHONPATH` pointing at its `src/`, so one
run compares two commits (e.g. main before issue 23's checkpoint rework and after):

    git worktree add /tmp/base 0a695d8
    python benchmarks/convert_path.py --tree before=/tmp/base/src --tree after=src

Writes `benchmarks/results/convert_path.json` (or `--json PATH`) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# where `convert` lives: checkpoints/convert.py now, checkpoints/hub.py during issue 23's
# rework, hub.py in the flat tree before it (a30dcd6)
CONVERT_HOMES = ("checkpoints/convert.py", "checkpoints/hub.py", "hub.py")


def _trace(argv: list[str], package: Path, files: set[str], climbs: set[tuple[str, str]]) -> None:
    """Run `llmscratch <argv>`, adding the files entered inside `convert` and its climbs."""
    from llmscratch.cli.main import main

    root = str(package)
    inside = []  # the frame of the `convert` call being traced (empty: not inside)

    def ours(frame) -> str | None:
        name = frame.f_code.co_filename
        return os.path.relpath(name, root) if name.startswith(root) else None

    def profile(frame, event, arg):
        if event == "return" and inside and frame is inside[0]:
            inside.clear()
        if event != "call":
            return
        callee = ours(frame)
        if callee is None or frame.f_code.co_name == "<module>":
            return
        if not inside:
            if frame.f_code.co_name == "convert" and callee in CONVERT_HOMES:
                inside.append(frame)
            else:
                return
        files.add(callee)
        chain = []  # the package files above this call, nearest first, up to `convert`
        up = frame.f_back
        while up is not None and inside and up is not inside[0].f_back:
            f = ours(up)
            if f is not None and (not chain or chain[-1] != f):
                chain.append(f)
            up = up.f_back
        if chain and chain[0] != callee and callee in chain[1:]:
            climbs.add((chain[0], callee))

    sys.setprofile(profile)
    try:
        code = main(argv)
    finally:
        sys.setprofile(None)
    assert code in (0, None), f"llmscratch {' '.join(argv)} failed"


def child() -> None:
    """In the measured tree's interpreter: make the run folders, convert them there and back."""
    import warnings

    import torch

    import llmscratch
    from llmscratch.cli.main import main
    from llmscratch.tokenizer import WordPieceTokenizer, get_tokenizer

    try:  # the layered tree
        from llmscratch.checkpoints.run import save_model
        from llmscratch.models.bert import Bert, BertConfig
        from llmscratch.models.gpt import GPT, GPTConfig
    except ImportError:  # the flat tree before issue 23
        from llmscratch.bert import Bert, BertConfig
        from llmscratch.checkpoint import save_model
        from llmscratch.model import GPT, GPTConfig

    warnings.simplefilter("ignore")
    package = Path(llmscratch.__file__).resolve().parent
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    runs = {
        "gpt2": (GPT(GPTConfig.from_name("tiny")), get_tokenizer("gpt2")),
        "llama": (GPT(GPTConfig.from_name("llama-tiny")), get_tokenizer("gpt2")),
        "bert": (Bert(BertConfig.from_name("bert-tiny", vocab_size=len(vocab))), WordPieceTokenizer(vocab)),
    }
    files: set[str] = set()
    climbs: set[tuple[str, str]] = set()
    per_family = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, tokenizer) in runs.items():
            run, hf = Path(tmp) / f"{name}-run", Path(tmp) / f"{name}-hf"
            save_model(model, run, tokenizer)
            main(["convert", str(run), str(Path(tmp) / f"{name}-warm")])  # lazy imports happen here, untraced
            mine: set[str] = set()
            _trace(["convert", str(run), str(hf)], package, mine, climbs)
            _trace(["convert", str(hf), str(Path(tmp) / f"{name}-run2")], package, mine, climbs)
            per_family[name] = sorted(mine)
            files |= mine
    print(json.dumps({"package": str(package), "files_entered": len(files), "files": sorted(files),
                      "climbs_back_up": len(climbs), "climbs": [f"{a} -> {b}" for a, b in sorted(climbs)],
                      "files_per_family": {k: len(v) for k, v in per_family.items()},
                      "family_files": per_family}))


def static_path(package: Path, entry: tuple[str, str]) -> dict:
    """Follow `convert` through the source: every package function or class a reached
    function names (through its module's imports, lazy ones included) is reached too.

    Depth first from `entry` (module, function), the files in the order the walk enters
    them; a *climb back up* is the walk entering a file it had already entered and left
    (`hub -> checkpoint -> weights -> bert_hub -> checkpoint`). A class counts as all its
    methods. Calls through objects (`model.forward`) are not followed: this is the code
    that the argument's *format* sends it through, not the model's.
    """
    import ast

    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path

    def resolve(importer: str, level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = importer.split(".") if modules[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    defs: dict[tuple[str, str], ast.AST] = {}  # (module, name) -> def or class
    names: dict[str, dict[str, tuple[str, str]]] = {}  # module -> local name -> (module, name)
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        table = names.setdefault(mod, {})
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[(mod, node.name)] = node
                table[node.name] = (mod, node.name)
        for node in ast.walk(tree):  # imports anywhere, function-level ones included
            if isinstance(node, ast.ImportFrom):
                source = resolve(mod, node.level, node.module)
                for alias in node.names:
                    table.setdefault(alias.asname or alias.name, (source, alias.name))

    def target(mod: str, name: str, seen=()) -> tuple[str, str] | None:
        """Follow re-exports (`from .x import f` in a package) to the defining module."""
        ref = names.get(mod, {}).get(name)
        if ref is None or ref in seen:
            return None
        if ref in defs:
            return ref
        return target(ref[0], ref[1], (*seen, ref)) if ref[0] in modules else None

    visited: set[tuple[str, str]] = set()
    entered: list[str] = []  # files in the order the walk first enters them
    climbs: list[tuple[str, str]] = []  # (caller file, callee file) of each re-entry

    def file_of(ref: tuple[str, str]) -> str:
        return os.path.relpath(modules[ref[0]], package)

    def visit(ref: tuple[str, str], caller: str | None) -> None:
        visited.add(ref)
        here = file_of(ref)
        if here != caller:
            if here in entered:
                climbs.append((caller, here))
            else:
                entered.append(here)
        for node in ast.walk(defs[ref]):
            if isinstance(node, ast.Name):
                nxt = target(ref[0], node.id)
                if nxt is not None and nxt not in visited:
                    visit(nxt, here)

    visit(target(*entry), None)
    return {"files_entered": len(entered), "files": entered, "climbs_back_up": len(climbs),
            "climbs": [f"{a} -> {b}" for a, b in climbs]}


def static_child() -> None:
    """In the measured tree's interpreter: the static walk from its `convert`."""
    import llmscratch

    package = Path(llmscratch.__file__).resolve().parent
    home = next(c for c in CONVERT_HOMES if (package / c).is_file() and "def convert(" in (package / c).read_text())
    module = "llmscratch." + home.removesuffix(".py").replace("/", ".")
    print(json.dumps(static_path(package, (module, "convert"))))


def measure(src: Path) -> dict:
    """Both measures of the tree at `src`, each in a fresh interpreter that imports it."""
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    result = {}
    for key, flag in (("static", "--static-child"), ("runtime", "--child")):
        out = subprocess.run([sys.executable, __file__, flag], env=env, capture_output=True, text=True,
                             check=True).stdout
        result[key] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", metavar="LABEL=SRC",
                   help="a label and the src/ folder of a checkout (repeat to compare); default: this one")
    p.add_argument("--json", help="write here instead of benchmarks/results/convert_path.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--static-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child()
        return 0
    if args.static_child:
        static_child()
        return 0
    trees = [t.split("=", 1) for t in (args.tree or [f"this={HERE.parent / 'src'}"])]
    rows = {label: measure(Path(src)) for label, src in trees}
    print("| tree | files `convert` reaches (source) | re-entries (source) | files run (gpt2+llama+bert) "
          "| climbs up the call stack (run) |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        st, rt = r["static"], r["runtime"]
        print(f"| {label} | {st['files_entered']} | {st['climbs_back_up']} | {rt['files_entered']} "
              f"| {rt['climbs_back_up']} |")
    sys.path.insert(0, str(HERE))
    from results import write_result

    write_result("convert_path", {"trees": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
