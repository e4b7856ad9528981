"""The span index against infini-gram: the same token ids, indexed by infini-gram's own
Rust indexer and queried with its C++ engine, give the same n-gram counts as ledgerlake's
index on 1,000 random n-grams, present and absent."""

import json
import resource
import subprocess
import sys

import numpy as np
from infini_gram.engine import InfiniGramEngine

from conftest import run


def write_tokenized(dir_, docs):
    """infini-gram's layout: u16 LE tokens, each document after 0xFFFF, plus byte offsets."""
    data, offsets = bytearray(), []
    for d in docs:
        offsets.append(len(data))
        data += b"\xff\xff" + np.asarray(d, dtype=np.uint16).tobytes()
    (dir_ / "tokenized.0").write_bytes(bytes(data))
    (dir_ / "offset.0").write_bytes(np.asarray(offsets, dtype=np.uint64).tobytes())


def build_infini_gram(data_dir, save_dir):
    """infini-gram's indexer; it skips tokenizing because tokenized.0 and offset.0 exist."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    subprocess.run(
        [sys.executable, "-m", "infini_gram.indexing", "--data_dir", str(data_dir), "--save_dir", str(save_dir),
         "--token_dtype", "u16", "--cpus", "1", "--mem", "1", "--ulimit", str(hard)],
        check=True, capture_output=True,
    )
    assert (save_dir / "table.0").exists()


def test_counts_equal_infini_gram_on_the_same_token_ids(tmp_path):
    rng = np.random.default_rng(2026)
    # Zipf-distributed ids over a 49,152-token vocabulary (SmolLM2's), so common n-grams
    # repeat many times and rare ones once.
    docs = [
        np.minimum(rng.zipf(1.3, size=int(rng.integers(5, 200))), 49151).astype(np.int64).tolist()
        for _ in range(3000)
    ]
    data_dir, ig_dir, ours = tmp_path / "data", tmp_path / "ig", tmp_path / "ours"
    data_dir.mkdir()
    ig_dir.mkdir()
    write_tokenized(ig_dir, docs)
    build_infini_gram(data_dir, ig_dir)
    built = json.loads(run("attribute", "spans", "build", "--index", str(ours),
                           "--tokenized", str(ig_dir / "tokenized.0")))
    assert built["docs"] == len(docs) and built["tokens"] == sum(map(len, docs))
    assert built["bytes_per_token"] < 7.0

    queries = []
    for i in range(1000):
        if i % 2 == 0:
            # A slice of a document: present.
            d = docs[int(rng.integers(len(docs)))]
            n = int(rng.integers(1, min(8, len(d)) + 1))
            s = int(rng.integers(0, len(d) - n + 1))
            queries.append(d[s:s + n])
        elif i % 10 == 1:
            # The end of one document and the start of the next: across the separator.
            j = int(rng.integers(len(docs) - 1))
            queries.append(docs[j][-2:] + docs[j + 1][:2])
        else:
            # Random ids: mostly absent.
            queries.append(rng.integers(1, 200, size=int(rng.integers(1, 5))).tolist())
    out = run("attribute", "spans", "count", "--index", str(ours),
              input="".join(json.dumps(q) + "\n" for q in queries))
    counts = [int(x) for x in out.split()]
    assert len(counts) == len(queries)

    engine = InfiniGramEngine(index_dir=str(ig_dir), eos_token_id=0)
    theirs = [engine.count(input_ids=q)["count"] for q in queries]
    mismatches = [(q, a, b) for q, a, b in zip(queries, counts, theirs) if a != b]
    assert not mismatches, mismatches[:5]
    assert sum(c == 0 for c in counts) >= 200, "the absent side is exercised"
    assert sum(c > 1 for c in counts) >= 200, "repeated n-grams are exercised"
    assert max(counts) > 1000
