"""The llama.cpp server's logprobs speed-up (shifu.serve.patch_llama_sort) gives the answer the full sort gave."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from shifu import serve


@pytest.fixture
def wanted():
    yield serve._top_wanted
    serve._top_wanted[0] = None


def pairs(n: int = 5000) -> list[tuple]:
    row = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    row[[7, 11, 4000]] = row.max()  # ties at the top: the token id decides, as in a sort of pairs
    row[[20, 21]] = np.float32(-np.inf)
    return list(zip(row, range(n)))


@pytest.mark.parametrize("k", [1, 2, 10, 20, 100])
def test_first_k_match_the_full_sort(wanted, k):
    wanted[0] = k
    got = serve._vocab_sorted(iter(pairs()), reverse=True)
    assert got[:k] == sorted(pairs(), reverse=True)[:k]
    assert len(got) == k


def test_without_a_noted_count_or_when_not_reversed_it_is_the_full_sort(wanted):
    wanted[0] = None
    assert serve._vocab_sorted(pairs(), reverse=True) == sorted(pairs(), reverse=True)
    wanted[0] = 3
    assert serve._vocab_sorted(pairs()) == sorted(pairs())
    assert serve._vocab_sorted([3, 1, 2], key=lambda x: -x, reverse=True) == [1, 2, 3]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_reads_its_sorts_only_up_to_the_count_asked():
    """The patch is only right while llama_cpp.llama uses `sorted` for these pairs alone and reads
    no further than [:logprobs]; a new llama-cpp-python that does otherwise fails here."""
    source = (Path(importlib.util.find_spec("llama_cpp").origin).parent / "llama.py").read_text()
    calls = re.findall(r"\bsorted\(\s*zip\((\w+), range\(len\(\1\)\)\),\s*reverse=True,?\s*\)", source)
    assert calls and len(calls) == len(re.findall(r"\bsorted\(", source))
    reads = re.findall(r"sorted_logprobs\[[^\]]*\]", source)
    assert reads and set(reads) == {"sorted_logprobs[:logprobs]"}
    assert "def _create_completion(" in source and re.search(r"_create_completion\([^)]*\n\s+prompt=", source)
