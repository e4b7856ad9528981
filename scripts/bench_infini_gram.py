"""The infini-gram reference of `ledgerlake bench spans`: builds an index with infini-gram's
own indexer from a tokenized file ledgerlake wrote (u16 LE, each document after 0xFFFF,
plus byte offsets), then times its C++ engine on the same queries. Prints one JSON object.

usage: bench_infini_gram.py DIR QUERIES OUTPUTS CPUS
  DIR      holds tokenized.0 and offset.0; the index is written beside them
  QUERIES  JSON lines: n-grams to count
  OUTPUTS  JSON lines: outputs whose maximal spans to find (engine.attribute)
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    dir_, queries_path, outputs_path, cpus = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    tokens = os.path.getsize(os.path.join(dir_, "tokenized.0")) // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with tempfile.TemporaryDirectory() as empty:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "infini_gram.indexing", "--data_dir", empty, "--save_dir", dir_,
             "--token_dtype", "u16", "--cpus", cpus, "--mem", "16", "--ulimit", str(hard)],
            check=True, capture_output=True,
        )
        build_s = time.perf_counter() - started
    files = ["tokenized.0", "table.0", "offset.0"]
    index_bytes = sum(os.path.getsize(os.path.join(dir_, f)) for f in files)

    from infini_gram.engine import InfiniGramEngine

    engine = InfiniGramEngine(index_dir=dir_, eos_token_id=0, load_to_ram=True)
    queries = [json.loads(l) for l in open(queries_path)]
    outputs = [json.loads(l) for l in open(outputs_path)]
    for q in queries[:50]:
        engine.count(input_ids=q)
    counts, count_ms = [], []
    for q in queries:
        t = time.perf_counter()
        counts.append(engine.count(input_ids=q)["count"])
        count_ms.append((time.perf_counter() - t) * 1e3)
    span_ms, spans = [], []
    for o in outputs:
        t = time.perf_counter()
        r = engine.attribute(input_ids=o, delim_ids=[], min_len=1, max_cnt=10, enforce_bow=False)
        span_ms.append((time.perf_counter() - t) * 1e3)
        spans.append(len(r["spans"]))
    print(json.dumps({
        "build_seconds": build_s,
        "tokens": tokens,
        "index_bytes": index_bytes,
        "counts": counts,
        "count_ms_p50": percentile(count_ms, 50),
        "count_ms_p99": percentile(count_ms, 99),
        "spans_ms_p50": percentile(span_ms, 50),
        "spans_ms_p99": percentile(span_ms, 99),
        "spans": spans,
    }))


if __name__ == "__main__":
    main()
