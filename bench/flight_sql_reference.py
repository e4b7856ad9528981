"""References for `ledgerlake bench sql`, measured in the same run as ledgerlake.

Usage: flight_sql_reference.py SPEC.json
SPEC: {"flight": "grpc://...", "key": "...", "files": {table: {"dir": ..., "files": [...]}},
       "queries": [[name, sql], ...], "runs": N}

Prints one JSON object: the Flight DoGet of inference_completed through pyarrow.flight,
pyarrow reading the same Parquet files from disk (the ceiling), and DuckDB running each
query over the same Parquet files. Times are the best of N runs, in seconds.
"""
import json
import sys
import time

import duckdb
import pyarrow.dataset as ds
import pyarrow.flight as fl


def best(runs, f):
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = f()
        times.append(time.perf_counter() - t)
    return min(times), result


def arrow_result(cursor):
    """The result as an Arrow table (DuckDB 2 renamed fetch_arrow_table to to_arrow_table)."""
    fetch = getattr(cursor, "to_arrow_table", None) or cursor.fetch_arrow_table
    return fetch()


def main():
    spec = json.load(open(sys.argv[1]))
    runs = spec["runs"]
    out = {}

    client = fl.FlightClient(spec["flight"])
    opts = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {spec['key']}".encode())])

    def doget():
        info = client.get_flight_info(fl.FlightDescriptor.for_path("inference_completed"), opts)
        return client.do_get(info.endpoints[0].ticket, opts).read_all()

    secs, table = best(runs, doget)
    out["flight_doget"] = {"seconds": secs, "rows": table.num_rows, "bytes": table.nbytes}
    del table

    inf = spec["files"]["inference_completed"]

    def local():
        dataset = ds.dataset(inf["files"], format="parquet", partitioning="hive", partition_base_dir=inf["dir"])
        return dataset.to_table()

    secs, table = best(runs, local)
    out["pyarrow_parquet"] = {"seconds": secs, "rows": table.num_rows, "bytes": table.nbytes}
    del table

    con = duckdb.connect()
    for name, t in spec["files"].items():
        files = ", ".join("'" + f.replace("'", "''") + "'" for f in t["files"])
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}], hive_partitioning = true)")
    out["duckdb"] = {}
    for name, sql in spec["queries"]:
        secs, rows = best(runs, lambda: arrow_result(con.execute(sql)).num_rows)
        out["duckdb"][name] = {"seconds": secs, "rows": rows}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
