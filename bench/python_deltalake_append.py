"""Reference for `ledgerlake bench ingest`: the Python deltalake package appending the same
rows to fresh Delta tables with write_deltalake(mode="append"), one commit per batch,
first in batches of the request size (what a client without group commit does), then in
batches of 50k rows (what a well-batched writer does). Arguments: the folder of Arrow files
(one per table), the request size, and at most how many seconds each pass may take."""
import itertools
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.ipc as ipc
from deltalake import write_deltalake

src, request_batch = sys.argv[1], int(sys.argv[2])
limit = float(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
tables = {}
for name in sorted(os.listdir(src)):
    with pa.memory_map(os.path.join(src, name)) as f:
        tables[name.removesuffix(".arrow")] = ipc.open_file(f).read_all()

for chunk in (request_batch, 50_000):
    # The tables' batches interleaved, as the requests interleave them; at most `limit` seconds.
    queues = [[(name, b) for b in t.to_batches(max_chunksize=chunk)] for name, t in tables.items()]
    work = [item for group in itertools.zip_longest(*queues) for item in group if item is not None]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        commits = rows = 0
        for name, batch in work:
            if time.perf_counter() - start > limit:
                break
            partition = ["event_date"] if "event_date" in batch.schema.names else None
            write_deltalake(os.path.join(out, name), pa.Table.from_batches([batch]), mode="append", partition_by=partition)
            commits += 1
            rows += batch.num_rows
        secs = time.perf_counter() - start
        print(f"write_deltalake append, {chunk:>6} rows/commit: {rows / secs:>9.0f} events/s ({commits} commits, {rows} rows, {secs:.1f} s)")
