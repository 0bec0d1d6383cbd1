"""Mutation check: plausible one-line bugs in helpers/, each of which a test file must catch.

Usage: python scripts/mutants.py [--list] [--no-baseline] [-k EXPRESSION] [--timeout SECONDS] [name ...]

Each mutant names a file, an exact snippet of it, the snippet's replacement and the test file that
should catch it. For each one the repository (the files git knows and the untracked ones it does not
ignore) is copied to a temporary folder, the snippet is replaced there, and the test file runs on the
copy (``pytest -x -q``, ``LLM_QUICK=1``, ``PYTHONPATH`` the copy): a failing run catches the mutant,
a passing one lets it survive. The real checkout is never edited, so a crash or a kill leaves it as it was.

First, unless ``--no-baseline``, every test file named runs once on an unmutated copy: a file that
fails there would "catch" every mutant, so the check stops. Names given on the command line (any
part of a mutant's name) pick the mutants to run; ``-k`` is passed to pytest, to see whether one
particular test catches them. Exit status: 0 when every mutant is caught, 1 when
one survives or pytest could not run, 2 when a snippet is no longer in its file (the code moved:
update the mutant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FALLBACK_PATHS = ["helpers", "tests", "scripts", "notebooks", "pyproject.toml", "README.md"]  # without git


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One plausible bug: ``original`` (exactly once in ``file``) becomes ``replacement``; ``tests`` should fail."""

    name: str
    file: str
    original: str
    replacement: str
    tests: str


MUTANTS = [
    # issue 23: bugs that once passed their test file
    Mutant("init: residual projections drawn at the full std",
           "helpers/modern.py", "residual_std = std / math.sqrt(2 * model.cfg.n_layers)", "residual_std = std",
           "tests/test_modern.py"),
    Mutant("init: the residual scale given to every linear layer",
           "helpers/modern.py",
           'std=residual_std if name.endswith(("out_proj", "down_proj"))\n                            else std)',
           "std=residual_std)", "tests/test_modern.py"),
    Mutant("GroupedQueryAttention: attention dropout never applied",
           "helpers/modern.py", "self.dropout if self.training else 0.0", "0.0", "tests/test_modern.py"),
    Mutant("loader: tie_word_embeddings defaults to True",
           "helpers/modern_weights.py", 'hf.get("tie_word_embeddings", False)', 'hf.get("tie_word_embeddings", True)',
           "tests/test_modern.py"),
    Mutant("loader: head_dim always hidden_size // n_heads",
           "helpers/modern_weights.py", 'head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads',
           'head_dim=hf["hidden_size"] // n_heads', "tests/test_modern.py"),
    Mutant("loader: a tied file that also stores lm_head.weight refused",
           "helpers/modern_weights.py", "        stored.discard(HEAD_ROW[0])\n", "", "tests/test_modern.py"),
    Mutant("padding mask: an all-padding row may attend to nothing (NaN)",
           "helpers/attention.py", "    allowed = allowed | (key_pos == query_pos)\n", "", "tests/test_attention.py"),
    Mutant("GPTModel: a cached prefix without a mask counted as padding",
           "helpers/model.py", "cached = torch.ones(batch, start, dtype=torch.bool",
           "cached = torch.zeros(batch, start, dtype=torch.bool", "tests/test_model.py"),
    Mutant("choose_branch: HF_HUB_OFFLINE=1 no longer offline",
           "helpers/online.py", '    if _flag("HF_HUB_OFFLINE"):\n        return Branch(False,',
           "    if False:\n        return Branch(False,", "tests/test_online.py"),
    Mutant("choose_branch: GPT-2 355M online without a CUDA GPU",
           "helpers/online.py", 'if where.type != "cuda":', "if False:", "tests/test_online.py"),
    Mutant("hub_failure_reason: offline mode no longer the reason",
           "helpers/online.py", '    if "OfflineModeIsEnabled" in names or _flag("HF_HUB_OFFLINE"):',
           "    if False:", "tests/test_online.py"),
    Mutant("generate_responses: answers not cut at the end-of-text id",
           "helpers/instruct.py", "tokenizer.decode(_answer_ids(row, eos_id))", "tokenizer.decode(row)",
           "tests/test_instruct.py"),
    # fresh ones, in the same modules
    Mutant("RoPE: the config's rope_theta ignored",
           "helpers/modern.py", "self.theta = cfg.rope_theta", "self.theta = 10_000.0", "tests/test_modern.py"),
    Mutant("RMSNorm: eps ignored",
           "helpers/modern.py", "        self.eps = eps\n", "        self.eps = 1e-6\n", "tests/test_modern.py"),
    Mutant("GroupedQueryAttention: key heads tiled instead of grouped",
           "helpers/modern.py", "        context = _causal_attention(queries, keys, values, past,",
           "        keys, values = keys.repeat(1, self.group_size, 1, 1), values.repeat(1, self.group_size, 1, 1)\n"
           "        context = _causal_attention(queries, keys, values, past,", "tests/test_modern.py"),
    Mutant("GroupedQueryAttention: queries not rotated",
           "helpers/modern.py", "queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)",
           "keys = apply_rope(keys, cos, sin)", "tests/test_modern.py"),
    Mutant("modern KV cache: new tokens placed one position early",
           "helpers/modern.py", "query_pos = torch.arange(past, past + n_tokens, device=queries.device)",
           "query_pos = torch.arange(past - 1, past + n_tokens - 1, device=queries.device)", "tests/test_modern.py"),
    Mutant("growing KV cache: cached values not copied when it grows",
           "helpers/modern.py", "                new_values[:, :, :self.length] = self.values[:, :, :self.length]\n",
           "", "tests/test_modern.py"),
    Mutant("init: embedding drawn at the residual std",
           "helpers/modern.py",
           "nn.init.normal_(module.weight, mean=0.0, std=std)",  # the embedding's line
           "nn.init.normal_(module.weight, mean=0.0, std=residual_std)", "tests/test_modern.py"),
    Mutant("loader: rms_norm_eps ignored",
           "helpers/modern_weights.py", 'norm_eps=hf.get("rms_norm_eps", 1e-6)', "norm_eps=1e-6",
           "tests/test_modern.py"),
    Mutant("loader: rope_theta of rope_parameters ignored",
           "helpers/modern_weights.py", 'theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))',
           'theta = hf.get("rope_theta", 10000.0)', "tests/test_modern.py"),
    Mutant("padding mask: padding keys visible",
           "helpers/attention.py", "allowed = (key_pos <= query_pos) & key_mask[:, None, :]",
           "allowed = key_pos <= query_pos", "tests/test_attention.py"),
    Mutant("GPTModel: padded rows' positions counted from 1",
           "helpers/model.py", "positions = (key_mask.cumsum(dim=1) - 1).clamp(min=0)[:, start:]",
           "positions = key_mask.cumsum(dim=1).clamp(min=0)[:, start:]", "tests/test_model.py"),
    Mutant("choose_branch: quick mode no longer offline",
           "helpers/online.py", "    if quick_mode():\n", "    if False:\n", "tests/test_online.py"),
    Mutant("generate_responses: the end-of-text id kept in the answer",
           "helpers/instruct.py", "row[:row.index(eos_id)]", "row[:row.index(eos_id) + 1]", "tests/test_instruct.py"),
    # Part 11's code: GGUF files, SmolLM2's tokenizer and template, both decoders through Part 09's code
    Mutant("gguf: llama.cpp's query/key rows not put back",
           "helpers/gguf.py",
           "weight.reshape(n_heads, head_dim // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)",
           "weight.reshape(rows, columns)", "tests/test_gguf.py"),
    Mutant("gguf: a file without output.weight read as untied",
           "helpers/gguf.py", "tie_weights=HEAD_ROW[0] not in file.tensors", "tie_weights=False", "tests/test_gguf.py"),
    Mutant("bpe: SmolLM2's digits not split one by one",
           "helpers/bpe.py", "SMOLLM_SPLIT_PATTERNS = (DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN)",
           "SMOLLM_SPLIT_PATTERNS = (GPT2_SPLIT_PATTERN,)", "tests/test_gguf_tokenizer.py"),
    Mutant("bpe: a run of unknown bytes becomes one unknown token per byte",
           "helpers/bpe.py",
           "            ids = [index for i, index in enumerate(ids) if not (index == self.unk_id and i "
           "and ids[i - 1] == index)]\n", "            pass\n", "tests/test_gguf_tokenizer.py"),
    Mutant("chat_format: no default system message",
           "helpers/chat_format.py", '        turns.insert(0, ("system", system_prompt))', "        pass",
           "tests/test_chat_format.py"),
    # (rotating a padded row at the batch's positions instead of its own is no bug: RoPE sees only the
    # distance between a query and a key, the same for every row whatever its padding)
    Mutant("ModernModel: the padding mask not passed to the blocks",
           "helpers/modern.py",
           "            x = block(x, cos, sin, kv_cache.layers[index] if kv_cache is not None else None, attn_mask)",
           "            x = block(x, cos, sin, kv_cache.layers[index] if kv_cache is not None else None)",
           "tests/test_decoders.py"),
    Mutant("generate_responses: the end id GPT-2's whatever the prompt format",
           "helpers/instruct.py", "        eos_id = prompt_format.end_id(tokenizer)", "        eos_id = 50256",
           "tests/test_decoders.py"),
    Mutant("PreferenceDataset: the answer counted from before the format's header",
           "helpers/preference.py", "prefix = prompt + prompt_format.header_ids(tokenizer)", "prefix = prompt",
           "tests/test_decoders.py"),
    Mutant("merge_lora: a decoder's config still says tied after the merge",
           "helpers/lora.py", "    if is_decoder(core) and core.cfg.tie_weights",
           "    if False and core.cfg.tie_weights",
           "tests/test_decoders.py"),
    Mutant("class head: a ModernModel refused by prepare_for_classification",
           "helpers/classify.py", "    if not is_decoder(core):", "    if not hasattr(core, 'pos_emb'):",
           "tests/test_decoders.py"),
]


class SnippetNotFound(Exception):
    """A mutant's snippet is not (exactly once) in its file: the code moved, the mutant needs updating."""


def repository_files(root: Path) -> list[str]:
    """The files of the working tree that git knows, or would add (untracked, not ignored)."""
    try:
        command = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        listed = subprocess.run(command, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return FALLBACK_PATHS
    return [name for name in listed.split("\0") if name]


def copy_repository(target: Path) -> None:
    for name in repository_files(ROOT):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        elif source.is_file():  # a file deleted but not yet committed is skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def mutated(mutant: Mutant, text: str) -> str:
    count = text.count(mutant.original)
    if count != 1:
        where = "is not in" if count == 0 else f"occurs {count} times in"
        raise SnippetNotFound(f"mutant {mutant.name!r}: its snippet {where} {mutant.file} (the code moved?): "
                              f"{mutant.original!r}")
    return text.replace(mutant.original, mutant.replacement)


def check_snippets(mutants: list[Mutant]) -> None:
    """Refuse, before anything runs, a mutant whose snippet is no longer (exactly once) in its file."""
    for mutant in mutants:
        mutated(mutant, (ROOT / mutant.file).read_text(encoding="utf-8"))
        if not (ROOT / mutant.tests).is_file():
            raise SnippetNotFound(f"mutant {mutant.name!r}: its test file {mutant.tests} does not exist")


def pytest_environment(copy: Path) -> dict[str, str]:
    env = {**os.environ, "LLM_QUICK": "1", "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    # the copy has no ../shared beside it, which conftest.py would find beside the checkout
    for variable, folder in [("LLM_DATA_MIRROR", SHARED / "data"), ("TIKTOKEN_CACHE_DIR", SHARED / "tiktoken_cache")]:
        if variable not in env and folder.is_dir():
            env[variable] = str(folder)
    return env


def run_tests(mutant: Mutant | None, tests: str, timeout: float,
              keyword: str | None = None) -> tuple[int | None, str, float]:
    """Pytest's exit status (None: timed out), the first failure it names, and the seconds it took."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as folder:
        copy = Path(folder) / "repo"
        copy.mkdir()
        copy_repository(copy)
        if mutant is not None:
            path = copy / mutant.file
            path.write_text(mutated(mutant, path.read_text(encoding="utf-8")), encoding="utf-8")
        env = pytest_environment(copy)
        where = subprocess.run([sys.executable, "-c", "import helpers; print(helpers.__file__)"], cwd=copy, env=env,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):  # an installed helpers would be tested instead of the mutant
            raise RuntimeError(f"the copy's tests import helpers from {where or 'nowhere'}, not from {copy}")
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", tests]
        command += ["-k", keyword] if keyword else []
        start = time.monotonic()
        try:
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:.0f} s", time.monotonic() - start
        seconds = time.monotonic() - start
    lines = result.stdout.splitlines()
    failure = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), "")
    if result.returncode not in (0, 1) and not failure:  # a collection error, a crash: its last words
        failure = ((result.stdout + result.stderr).strip().splitlines() or [""])[-1]
    return result.returncode, failure, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of each test file unmutated")
    parser.add_argument("-k", dest="keyword", help="run only the tests pytest -k selects with this expression")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one pytest run may take (default 600)")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.names or any(word.lower() in m.name.lower() for word in args.names)]
    if not chosen:
        print(f"no mutant's name contains any of {args.names}; --list shows them", file=sys.stderr)
        return 2
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name}  [{mutant.file} -> {mutant.tests}]")
        return 0
    try:
        check_snippets(chosen)
    except SnippetNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if not args.no_baseline:
        for tests in sorted({mutant.tests for mutant in chosen}):
            status, failure, seconds = run_tests(None, tests, args.timeout, args.keyword)
            print(f"baseline  {tests}: {'passes' if status == 0 else 'FAILS'} ({seconds:.0f} s)", flush=True)
            if status == 5:
                print(f"error: pytest -k {args.keyword!r} selects no test of {tests}", file=sys.stderr)
                return 1
            if status != 0:
                print(f"error: {tests} fails without any mutant ({failure or f'pytest exit {status}'}); "
                      "fix it first, or every mutant would look caught", file=sys.stderr)
                return 1

    survivors, broken = [], []
    for mutant in chosen:
        status, failure, seconds = run_tests(mutant, mutant.tests, args.timeout, args.keyword)
        if status == 0:
            verdict = "SURVIVED"
            survivors.append(mutant)
        elif status in (1, None):  # a failing test, or a hang the mutant caused
            verdict = "caught  "
        else:
            verdict = "ERROR   "
            broken.append(mutant)
        detail = f": {failure}" if failure and status != 0 else ""
        print(f"{verdict}  {mutant.name}  [{mutant.tests}, {seconds:.0f} s]{detail}", flush=True)

    caught = len(chosen) - len(survivors) - len(broken)
    print(f"\ncaught {caught}/{len(chosen)}")
    for mutant in survivors:
        print(f"survived: {mutant.name} ({mutant.file}: {mutant.original.strip()!r} -> "
              f"{mutant.replacement.strip()!r}; {mutant.tests} still passes)")
    for mutant in broken:
        print(f"pytest could not run with: {mutant.name} (see its line above)")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
