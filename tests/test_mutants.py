"""scripts/mutants.py, the mutation check: mutants applied to a copy, counted, and a moved snippet refused."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mutants  # noqa: E402
from mutants import Mutant  # noqa: E402


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_mutant_whose_snippet_moved_is_refused_in_one_line_before_anything_runs(monkeypatch, capsys):
    # given a mutant whose snippet is no longer in its file
    moved = Mutant("moved", "helpers/runtime.py", "def quick_mode_that_was_renamed():", "pass", "tests/test_runtime.py")
    monkeypatch.setattr(mutants, "MUTANTS", [moved])
    monkeypatch.setattr(mutants, "run_tests", lambda *args, **kwargs: pytest.fail("nothing should run"))

    # when the check runs, then it stops at once with exit status 2 and one line naming the mutant and the file
    assert mutants.main([]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'moved'" in error and "is not in helpers/runtime.py" in error


def test_a_snippet_that_occurs_twice_is_refused_too():
    twice = Mutant("twice", "helpers/x.py", "a", "b", "tests/test_x.py")
    with pytest.raises(mutants.SnippetNotFound, match="occurs 2 times in helpers/x.py"):
        mutants.mutated(twice, "a = a")


@pytest.mark.slow
def test_a_caught_and_a_surviving_mutant_are_counted_and_the_checkout_is_left_as_it_was(monkeypatch, capsys):
    # given a mutant its test catches (quick mode no longer reads "yes") and one no test can see (a docstring)
    caught = Mutant("quick mode reads only 1", "helpers/runtime.py", '{"1", "true", "yes", "on"}', '{"1"}',
                    "tests/test_runtime.py")
    invisible = Mutant("a docstring reworded", "helpers/runtime.py", '"""True when ``LLM_QUICK`` is set',
                       '"""Whether ``LLM_QUICK`` is set', "tests/test_runtime.py")
    monkeypatch.setattr(mutants, "MUTANTS", [caught, invisible])
    before = _digest(ROOT / "helpers" / "runtime.py")

    # when the check runs them (on the quick-mode tests only, to be quick)
    status = mutants.main(["--no-baseline", "-k", "quick_mode"])

    # then one is caught, one survives and is named, the exit status says so, and the real file is untouched
    out = capsys.readouterr().out
    assert status == 1
    assert "caught 1/2" in out and "survived: a docstring reworded" in out
    assert "test_quick_mode_reads_llm_quick" in out  # the test that caught the other
    assert _digest(ROOT / "helpers" / "runtime.py") == before
