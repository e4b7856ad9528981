"""Reference for `ledgerlake bench ingest`: the Python deltalake package appending the same
rows to fresh Delta tables with write_deltalake(mode="append"), one commit per batch,
first in batches of the request size (what a client without group commit does), then in
batches of 50k rows (what a well-batched writer does)."""
import os
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.ipc as ipc
from deltalake import write_deltalake

src, request_batch = sys.argv[1], int(sys.argv[2])
tables = {}
for name in sorted(os.listdir(src)):
    with pa.memory_map(os.path.join(src, name)) as f:
        tables[name.removesuffix(".arrow")] = ipc.open_file(f).read_all()
rows = sum(t.num_rows for t in tables.values())

for chunk in (request_batch, 50_000):
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        commits = 0
        for name, table in tables.items():
            partition = ["event_date"] if "event_date" in table.column_names else None
            for batch in table.to_batches(max_chunksize=chunk):
                write_deltalake(os.path.join(out, name), pa.Table.from_batches([batch]), mode="append", partition_by=partition)
                commits += 1
        secs = time.perf_counter() - start
        print(f"write_deltalake append, {chunk:>6} rows/commit: {rows / secs:>9.0f} events/s ({commits} commits, {secs:.1f} s)")
