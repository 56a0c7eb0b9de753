"""Hashed n-gram features with a stable hash (the feature space of DSIR and the quality classifier).

A text is lower-cased and split with NLTK's ``WordPunctTokenizer`` pattern ``\\w+|[^\\w\\s]+`` (what the DSIR
code uses); its features are the unigrams and the bigrams (``"w1 w2"``) up to order ``n``, and each
feature f goes to bucket ``blake2b_64(f) mod num_buckets`` (``hash_name="sha256"``: ``int(sha256(f)) mod
num_buckets``, the bucket of the DSIR authors' ``data-selection`` 1.0.3, which DSIR uses to select what that
package selects). Early DSIR research code hashed with Python's salted ``hash``; both hashes here give the
same buckets on every run and machine.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import scipy.sparse

__all__ = ["hashed_ngram_counts", "ngrams", "stable_bucket", "tokenize"]

_TOKEN = re.compile(r"\w+|[^\w\s]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word/punctuation tokens (``WordPunctTokenizer``)."""
    return _TOKEN.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int = 2) -> list[str]:
    """All 1..n-grams of ``tokens``, each joined by a space: unigrams first, then bigrams, …"""
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    feats = list(tokens)
    for order in range(2, n + 1):
        feats.extend(" ".join(tokens[i : i + order]) for i in range(len(tokens) - order + 1))
    return feats


HASHES = ("blake2b", "sha256")


def stable_bucket(feature: str, num_buckets: int, hash_name: str = "blake2b") -> int:
    """``int.from_bytes(blake2b(feature, 8 bytes), "little") mod num_buckets``, or for ``sha256`` the
    ``data-selection`` package's ``int(sha256(feature).hexdigest(), 16) mod num_buckets``: the same on every run."""
    if hash_name == "sha256":
        return int(hashlib.sha256(feature.encode("utf-8")).hexdigest(), 16) % num_buckets
    if hash_name != "blake2b":
        raise ValueError(f"hash_name must be one of {HASHES}, got {hash_name!r}")
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_buckets


def hashed_ngram_counts(
    texts: Sequence[str], num_buckets: int = 10_000, n: int = 2, hash_name: str = "blake2b"
) -> scipy.sparse.csr_matrix:
    """Sparse ``[len(texts), num_buckets]`` matrix; entry (i, b) = number of n-grams of text i in bucket b."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    cache: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for i, text in enumerate(texts):
        for feat in ngrams(tokenize(text), n):
            b = cache.get(feat)
            if b is None:
                b = cache[feat] = stable_bucket(feat, num_buckets, hash_name)
            rows.append(i)
            cols.append(b)
    data = np.ones(len(rows), dtype=np.float64)
    counts = scipy.sparse.csr_matrix((data, (rows, cols)), shape=(len(texts), num_buckets))
    counts.sum_duplicates()
    return counts
