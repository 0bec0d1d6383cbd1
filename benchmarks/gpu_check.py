"""One command that measures every training path of the series on a GPU: tokens/s, MFU, peak memory.

Usage (on a machine with CUDA, from the repository root):
    .venv/bin/python benchmarks/gpu_check.py [--steps 5] [--no-compile]      # or: make gpu-check

Each path runs a few optimizer steps at GPT-2's true shapes on random token ids (no data or weights
are downloaded, so it runs on an offline machine), with ``precision="auto"``, as the notebooks and
``python -m helpers.pretrain`` do:

| path | model | what one step does |
| --- | --- | --- |
| pretrain | GPT-2 124M, context 1024 | next-token loss, AdamW (fused), ``torch.compile`` unless ``--no-compile`` |
| classify | GPT-2 124M + 2-way head | ``helpers.classify.calc_loss_batch`` on 120-token texts, all weights trained |
| instruct | GPT-2 355M | next-token loss with masked (-100) targets, batch 8, 256 tokens |
| dpo | GPT-2 355M policy + frozen reference | ``helpers.preference.dpo_batch_loss``, batch 8, 256 tokens |

MFU divides the achieved FLOP/s (``helpers.pretrain.flops_per_token`` per trained token; DPO adds the
reference's forward pass, a third more) by ``helpers.runtime.peak_flops``. Without CUDA the script
refuses, unless ``--tiny`` runs the same code at toy sizes on any device (what the tests do, so it
cannot rot between the rare runs on a GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import torch
from _common import print_report

from helpers import runtime
from helpers.classify import calc_loss_batch as classification_loss
from helpers.classify import prepare_for_classification
from helpers.model import GPT_CONFIGS, GPTConfig, GPTModel
from helpers.preference import dpo_batch_loss, frozen_reference
from helpers.pretrain import flops_per_token
from helpers.train import calc_loss_batch

TINY = GPTConfig(vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)


@dataclasses.dataclass
class Path:
    """One training path: its model config, batch shape and how one step's loss is computed."""

    name: str
    cfg: GPTConfig
    batch: int
    n_tokens: int
    flops_factor: float = 1.0  # DPO: the reference's forward pass on top of the policy's training step
    compile: bool = False


def _config(preset: str, tiny: bool, context_length: int) -> GPTConfig:
    base = TINY if tiny else GPT_CONFIGS[preset]
    return dataclasses.replace(base, drop_rate=0.0, context_length=min(base.context_length, context_length))


def paths(tiny: bool, compile_pretrain: bool) -> list[Path]:
    """The four paths at GPT-2's true shapes, or at toy sizes with ``tiny``."""
    shrink = (lambda n: min(n, 32)) if tiny else (lambda n: n)
    return [
        Path("pretrain", _config("gpt2", tiny, 1024), 2 if tiny else 8, shrink(1024), compile=compile_pretrain),
        Path("classify", _config("gpt2", tiny, 1024), 2 if tiny else 8, shrink(120)),
        Path("instruct", _config("gpt2-medium", tiny, 1024), 2 if tiny else 8, shrink(256)),
        Path("dpo", _config("gpt2-medium", tiny, 1024), 2 if tiny else 8, shrink(256), flops_factor=4 / 3),
    ]


def _step_function(path: Path, device: torch.device, precision: str) -> Callable[[], None]:
    """A closure that runs one optimizer step of ``path`` on fresh random ids."""
    torch.manual_seed(0)
    model = GPTModel(path.cfg).to(device).train()
    cfg, shape = path.cfg, (path.batch, path.n_tokens)
    random_ids = lambda: torch.randint(0, cfg.vocab_size, shape, device=device)
    if path.name == "classify":
        prepare_for_classification(model, num_classes=2, trainable_blocks=None)
        loss_of_batch = lambda: classification_loss(random_ids(), torch.randint(0, 2, (path.batch,)), model, device)
    elif path.name == "dpo":
        reference = frozen_reference(model)
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        mask[:, : path.n_tokens // 2] = False  # the prompt half is not scored
        batch = lambda: {"chosen": random_ids(), "rejected": random_ids(), "chosen_mask": mask, "rejected_mask": mask}
        loss_of_batch = lambda: dpo_batch_loss(model, reference, batch(), 0.1, device)[0]
    else:
        forward = torch.compile(model) if path.compile else model
        masked = path.name == "instruct"

        def loss_of_batch():
            ids = random_ids()
            targets = torch.roll(ids, -1, 1)
            if masked:
                targets[:, : path.n_tokens // 3] = -100  # the prompt's targets are ignored
            return calc_loss_batch(ids, targets, forward, device)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        with runtime.autocast(device, precision):
            loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(path: Path, device: torch.device, precision: str, steps: int, peak: float | None) -> list[str]:
    """Run ``steps`` timed steps (after one warm-up) and return the report row."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = _step_function(path, device, precision)
    step()  # warm-up, compilation included
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_second = path.batch * path.n_tokens * (2 if path.name == "dpo" else 1) / seconds
    flops = flops_per_token(dataclasses.replace(path.cfg, context_length=path.n_tokens)) * path.flops_factor
    mfu = f"{100 * flops * tokens_per_second / peak:.1f}%" if peak else "n/a"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else "n/a"
    dtype = str(runtime.compute_dtype(device, precision)).removeprefix("torch.")
    label = path.name + (" (compiled)" if path.compile else "")
    return [label, f"{path.batch}x{path.n_tokens}", dtype, f"{seconds * 1e3:,.0f}", f"{tokens_per_second:,.0f}",
            mfu, memory]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the pretraining path")
    parser.add_argument("--precision", choices=runtime.PRECISIONS, default="auto")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on any device (to test this script)")
    parser.add_argument("--only", nargs="+", choices=["pretrain", "classify", "instruct", "dpo"])
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    device = runtime.device()
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: no CUDA GPU here; run it on a machine with one (or pass --tiny to test the script)",
              file=sys.stderr)
        return 2
    peak, source = runtime.peak_flops(device)
    rows = [measure(path, device, args.precision, args.steps, peak)
            for path in paths(args.tiny, compile_pretrain=not args.no_compile and device.type == "cuda")
            if not args.only or path.name in args.only]
    peak_label = f"{peak / 1e9:,.0f} GFLOP/s ({source})" if peak else "unknown"
    print_report(f"{args.steps} timed steps per path, precision {args.precision}, peak {peak_label}",
                 ["path", "batch x tokens", "dtype", "ms/step", "tokens/s", "MFU", "peak GiB"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
