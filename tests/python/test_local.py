"""End-to-end: the real binary on a local lake, read back by the Python deltalake and
polars packages; crash safety under kill -9; two processes on the same tables."""
import json
import os
import re
import stat
import subprocess
import threading
import time
from decimal import Decimal

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import ADMIN, BIN, demo_ndjson, key_file, kill_9_then_retry, run, signed

TABLES = ["datanet_created", "datanet_updated", "contribution_submitted", "contribution_reviewed", "access_granted",
          "model_registered", "inference_completed", "fee_charged", "inference_tokens", "attributions", "stake_changed",
          "training_runs", "training_metrics", "citations", "epochs", "rewards", "anchors", "access_revoked", "access_requested",
          "voided_events"]


def stored_ids(lake, table):
    path = os.path.join(lake, table)
    if not os.path.exists(os.path.join(path, "_delta_log")):
        return []
    return DeltaTable(path).to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()


def all_ids(lake):
    ids = []
    for t in TABLES:
        ids += stored_ids(lake, t)
    return ids


def test_demo_ingest_tables_and_python_readers(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    events = tmp_path / "events.ndjson"
    events.write_text(demo_ndjson(srv, 6000, seed=3))
    out = run("ingest", str(events), "--server", srv.url, "--api-key-file", key_file(ADMIN), "--batch", "1000")
    assert "accepted 6000, duplicates 0, rejected 0" in out, out
    # Idempotent: loading the same file again stores nothing.
    out = run("ingest", str(events), "--server", srv.url, "--api-key-file", key_file(ADMIN))
    assert "accepted 0, duplicates 6000" in out, out

    listing = run("tables", "--data", str(lake))
    rows = {line.split()[0]: int(line.split()[3]) for line in listing.splitlines()[1:]}
    assert sum(rows.values()) == 6000, listing

    # The Python deltalake package reads every table, with typed columns.
    fees = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    assert fees.num_rows == rows["fee_charged"] > 0
    assert str(fees.schema.field("amount").type) == "decimal128(38, 0)"
    assert str(fees.schema.field("event_time").type) == "timestamp[us, tz=UTC]"
    assert DeltaTable(str(lake / "fee_charged")).metadata().partition_columns == ["event_date"]
    sent = [json.loads(line) for line in events.read_text().splitlines()]
    sent_fees = {e["event_id"]: int(e["amount"]) for e in sent if e["kind"] == "fee.charged"}
    got = dict(zip(fees.column("event_id").to_pylist(), fees.column("amount").to_pylist()))
    assert got == {k: Decimal(v) for k, v in sent_fees.items()}, "amounts must be exact"

    # polars reads them too.
    contributions = pl.read_delta(str(lake / "contribution_submitted"))
    assert contributions.height == rows["contribution_submitted"]
    assert contributions["contributor"][0].startswith("0x")
    assert contributions["tags"].dtype == pl.List(pl.String)
    models = pl.read_delta(str(lake / "model_registered"))
    assert models["datanets"].dtype == pl.List(pl.Struct({"datanet_id": pl.String, "version": pl.Int64}))

    # `ledgerlake sql` agrees with what Python read, in every format it writes.
    total = sum(sent_fees.values())
    query = "SELECT count(*) AS n, CAST(sum(amount) AS VARCHAR) AS total FROM fee_charged"
    out = json.loads(run("sql", "--data", str(lake), query, "--format", "json"))
    assert out == [{"n": fees.num_rows, "total": str(total)}], out
    assert run("sql", "--data", str(lake), query, "--format", "csv").splitlines() == ["n,total", f"{fees.num_rows},{total}"]
    parquet = tmp_path / "fees.parquet"
    with open(parquet, "wb") as f:
        subprocess.run([BIN, "sql", "--data", str(lake), "SELECT * FROM fee_charged", "--format", "parquet"], stdout=f, check=True)
    assert pl.read_parquet(parquet).height == fees.num_rows
    arrow = subprocess.run([BIN, "sql", "--data", str(lake), "SELECT * FROM fees_by_model_day", "--format", "arrow"],
                           capture_output=True, check=True).stdout
    import pyarrow.ipc
    by_day = pyarrow.ipc.open_stream(arrow).read_all()
    assert sum(by_day.column("fees").to_pylist()) == fees.num_rows
    bad = subprocess.run([BIN, "sql", "--data", str(lake), "DELETE FROM fee_charged"], capture_output=True, text=True)
    assert bad.returncode != 0 and "only read-only queries are allowed" in bad.stderr
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == fees.num_rows


def test_admin_key_is_generated_once_and_private(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake, admin_key=None)
    assert srv.key and srv.key.startswith("llk_admin_"), srv.stdout
    key_file = lake / "_ledgerlake" / "admin.key"
    assert key_file.read_text().strip() == srv.key
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # The key itself never goes to stdout (service logs keep it): only the file it is in.
    named = re.search(r"admin key: generated, in (\S+) \(mode 0600\)", srv.stdout)
    assert named and os.path.samefile(named.group(1), key_file), srv.stdout
    assert srv.key not in srv.stdout
    assert srv.post(b"").status_code == 200
    srv.stop()
    again = server_factory(lake, admin_key=None)
    named = re.search(r"admin key: in (\S+)", again.stdout)
    assert named and os.path.samefile(named.group(1), key_file) and "admin key: generated" not in again.stdout, again.stdout
    assert again.key == srv.key and srv.key not in again.stdout
    assert again.post(b"", key=srv.key).status_code == 200


def test_config_file_and_environment(tmp_path, server_factory):
    (tmp_path / "ledgerlake.toml").write_text(f'data = "{tmp_path / "from-toml"}"\nflush_max_delay_ms = 10\n')
    port_env = {"LEDGERLAKE_DATA": str(tmp_path / "from-env")}
    srv = server_factory(tmp_path / "ignored", env=port_env, cwd=tmp_path, extra=("--config", str(tmp_path / "ledgerlake.toml")))
    # The --data flag wins over the environment, which wins over the file.
    assert str(tmp_path / "ignored") in srv.stdout
    srv.stop()
    proc = subprocess.run([BIN, "tables"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **port_env})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "from-env").exists() and not (tmp_path / "from-toml").exists()


def test_kill_9_loses_no_acknowledged_event(tmp_path, server_factory):
    lake = tmp_path / "lake"
    kill_9_then_retry(lambda: server_factory(lake), lambda: all_ids(lake))


def test_two_processes_write_the_same_tables(tmp_path, server_factory):
    lake = tmp_path / "lake"
    a = server_factory(lake, state_dir=tmp_path / "state-a")
    # Signed for the lake's deployment, which every process serving it shares.
    lines = demo_ndjson(a, 8000, seed=21).splitlines()
    setup = [line for line in lines if json.loads(line)["kind"] not in ("inference.completed", "fee.charged")]
    rest = [line for line in lines if line not in set(setup)]
    assert a.post("\n".join(setup)).json()["accepted"] == len(setup)
    b = server_factory(lake, state_dir=tmp_path / "state-b")
    chunks = ["\n".join(rest[i:i + 250]) for i in range(0, len(rest), 250)]
    results = []

    def send(srv, order):
        for c in order:
            r = srv.post(c)
            assert r.status_code == 200, r.text
            results.append(r.json())

    ta = threading.Thread(target=send, args=(a, chunks))
    tb = threading.Thread(target=send, args=(b, list(reversed(chunks))))
    ta.start(); tb.start(); ta.join(); tb.join()
    assert sum(r["accepted"] for r in results) == len(rest)
    ids = all_ids(lake)
    assert len(ids) == len(set(ids)) == len(lines)


def test_cli_keys_sign_apikey_parquet_and_maintenance(tmp_path, server_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import requests

    lake = tmp_path / "lake"
    srv = server_factory(lake)
    # A user makes keys and signs a datanet, a contribution and a review with the CLI, for
    # this server's deployment (EIP-712); the server accepts them.
    owner = dict(line.split(": ") for line in run("keys", "new").splitlines())
    alice = dict(line.split(": ") for line in run("keys", "new").splitlines())
    (tmp_path / "content.txt").write_text("Glaciers lost 5% of their mass since 2000.")
    created = signed(srv, owner["private_key"], {"kind": "datanet.created", "event_id": "d1", "datanet_id": "glaciers",
                                                 "owner": owner["address"], "name": "Glaciers", "license": "CC0-1.0"})
    contribution = json.loads(run("sign", "--key-file", key_file(alice["private_key"]), "--server", srv.url, "contribution", "--datanet", "glaciers",
                                  "--content-file", str(tmp_path / "content.txt"), "--license", "CC0-1.0", "--event-id", "c1"))
    assert contribution["contributor"] == contribution["signer"] == alice["address"]
    assert contribution["event"]["contribution_id"] == contribution["contribution_id"]
    assert contribution["event"]["content"] == (tmp_path / "content.txt").read_text()
    review = json.loads(run("sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "review", "--contribution",
                            contribution["contribution_id"], "--datanet", "glaciers", "--verdict", "approved", "--event-id", "r1"))
    assert review["reviewer"] == owner["address"] and review["event"]["signature"] == review["signature"]
    events = [created, contribution["event"], review["event"]]
    # A signature covers the event's id: the same signed contribution under another id is refused.
    forged = {**contribution["event"], "event_id": "c1-again"}
    r = srv.post(json.dumps(forged), content_type="application/json")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "signature", r.text
    r = srv.post(json.dumps(events), content_type="application/json", params={"atomic": "true"})
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text

    # An ingest-only key made with the CLI can post but cannot make keys, and what it may
    # cause is decided per event: its fees are refused (service facts), naming the kind.
    made = json.loads(run("apikey", "--role", "ingest", "--server", srv.url, "--api-key-file", key_file(ADMIN)))
    assert made["role"] == "ingest"
    denied = requests.post(srv.url + "/v1/keys", json={"role": "admin"}, headers={"Authorization": f"Bearer {made['key']}"})
    assert denied.status_code == 403
    fee = {"kind": "fee.charged", "event_id": "fee-by-ingest-key", "event_time": "2026-11-24T10:00:00Z", "inference_id": "inf-x",
           "model_id": "glacier-lora", "payer": "key_x", "amount": "5"}
    r = srv.post(json.dumps(fee), content_type="application/json", key=made["key"])
    assert r.status_code == 422 and r.json()["accepted"] == 0 and r.json()["errors"][0]["field"] == "kind", r.text
    # A service key (an external serving fleet's) writes them, and cannot make keys either.
    service = json.loads(run("apikey", "--role", "service", "--server", srv.url, "--api-key-file", key_file(ADMIN)))
    assert service["role"] == "service"
    denied = requests.post(srv.url + "/v1/keys", json={"role": "admin"}, headers={"Authorization": f"Bearer {service['key']}"})
    assert denied.status_code == 403

    # Parquet files of one kind load through `ledgerlake ingest --kind`.
    n = 300
    table = pa.table({
        "event_id": [f"pq-{i}" for i in range(n)],
        "event_time": pa.array([1_790_000_000_000_000 + i for i in range(n)], pa.timestamp("us", tz="UTC")),
        "inference_id": [f"inf-{i}" for i in range(n)],
        "model_id": ["glacier-lora"] * n,
        "payer": ["key_x"] * n,
        "amount": pa.array([Decimal(10**30 + i) for i in range(n)], pa.decimal128(38, 0)),
    })
    for part in range(3):
        pq.write_table(table.slice(part * 100, 100), tmp_path / f"fees-{part}.parquet")
    files = [str(tmp_path / f"fees-{p}.parquet") for p in range(3)]
    # (An operator's import: the admin key's fees are not bounded by prices; a service
    # key's come with their completions, test_attacks.)
    out = run("ingest", *files, "--kind", "fee.charged", "--server", srv.url, "--api-key-file", key_file(ADMIN), "--batch", "50")
    assert f"accepted {n}, duplicates 0, rejected 0" in out, out
    fees = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    assert sorted(fees.column("amount").to_pylist()) == [Decimal(10**30 + i) for i in range(n)]
    srv.stop()

    # Maintenance: compaction merges the six small files, vacuum removes them, rows stay.
    files_before = len(DeltaTable(str(lake / "fee_charged")).file_uris())
    out = run("maintenance", "compact", "--table", "fee_charged", "--data", str(lake))
    assert f"compacted {files_before} files into" in out, out
    out = run("maintenance", "vacuum", "--table", "fee_charged", "--retention-hours", "0", "--data", str(lake))
    assert f"vacuumed {files_before} files" in out, out
    after = DeltaTable(str(lake / "fee_charged"))
    assert len(after.file_uris()) < files_before
    assert after.to_pyarrow_table().num_rows == n
    # And a restarted server still knows every id.
    again = server_factory(lake)
    r = again.post(json.dumps(events), content_type="application/json")
    assert r.json()["duplicates"] == 3


def test_sql_over_http(tmp_path, server_factory):
    import io
    import pyarrow.ipc
    import pyarrow.parquet as pq
    import requests
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    assert srv.post(demo_ndjson(srv, 3000, seed=5)).status_code == 200
    fees = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    url = srv.url + "/v1/sql"
    model = fees.column("model_id")[0].as_py()
    want = sum(1 for m in fees.column("model_id").to_pylist() if m == model)

    # JSON with a parameter.
    r = requests.post(url, json={"sql": "SELECT count(*) AS n FROM fee_charged WHERE model_id = $1", "params": [model]}, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == [{"n": want}]

    everything = {"sql": "SELECT event_id, amount FROM fee_charged ORDER BY event_id"}
    r = requests.post(url, json=everything, headers={**auth, "Accept": "application/x-ndjson"})
    assert r.status_code == 200 and len(r.text.splitlines()) == fees.num_rows
    r = requests.post(url, json=everything, headers={**auth, "Accept": "text/csv"})
    assert r.status_code == 200 and r.text.splitlines()[0] == "event_id,amount" and len(r.text.splitlines()) == fees.num_rows + 1
    r = requests.post(url, json=everything, headers={**auth, "Accept": "application/vnd.apache.arrow.stream"})
    table = pyarrow.ipc.open_stream(r.content).read_all()
    assert table.num_rows == fees.num_rows and str(table.schema.field("amount").type) == "decimal128(38, 0)"
    r = requests.post(url, json=everything, headers={**auth, "Accept": "application/vnd.apache.parquet"})
    assert pq.read_table(io.BytesIO(r.content)).num_rows == fees.num_rows

    # Errors are JSON with the right status, and nothing is written.
    assert requests.post(url, json=everything).status_code == 401
    assert requests.post(url, json=everything, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = requests.post(url, json={"sql": "SELEC 1"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_query"
    r = requests.post(url, json={"sql": "DELETE FROM fee_charged"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "read_only", r.text
    r = requests.post(url, json={"sql": "SELECT 1", "params": [[1]]}, headers=auth)
    assert r.status_code == 400 and "params[0]" in r.json()["error"]["message"]
    r = requests.post(url, data=b"not json", headers=auth)
    assert r.status_code == 400
    r = requests.post(url, json=everything, headers={**auth, "Accept": "image/png"})
    assert r.status_code == 406
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == fees.num_rows

    # The CLI against the running server, in a streamed format and as a table.
    remote = ["sql", "--server", srv.url, "--api-key-file", key_file(ADMIN)]
    csv = run(*remote, "SELECT count(*) AS n FROM fee_charged", "--format", "csv")
    assert csv.splitlines() == ["n", str(fees.num_rows)], csv
    assert str(fees.num_rows) in run(*remote, "SELECT count(*) AS n FROM fee_charged")
    bad = subprocess.run([BIN, *remote, "DROP TABLE fee_charged"], capture_output=True, text=True)
    assert bad.returncode != 0 and "400" in bad.stderr and "read-only" in bad.stderr, bad.stderr

    # A read-only key may query.
    reader = json.loads(run("apikey", "--role", "read", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["key"]
    r = requests.post(url, json={"sql": "SELECT 1 AS one"}, headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 200 and r.json() == [{"one": 1}], r.text


def test_sql_limits_come_from_configuration(tmp_path, server_factory):
    import requests
    lake = tmp_path / "lake"
    env = {"LEDGERLAKE_SQL_JSON_ROW_LIMIT": "10", "LEDGERLAKE_QUERY_TIMEOUT_S": "1"}
    srv = server_factory(lake, env=env)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    url = srv.url + "/v1/sql"
    many = {"sql": "SELECT * FROM generate_series(1, 100)"}
    r = requests.post(url, json=many, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_rows", r.text
    r = requests.post(url, json=many, headers={**auth, "Accept": "application/x-ndjson"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 100, "streaming formats have no row limit"
    # 10^12 rows cannot be counted within a second: the query is cancelled, the server serves on.
    r = requests.post(url, json={"sql": "SELECT count(*) FROM generate_series(1, 1000000000000)"}, headers=auth)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert requests.post(url, json={"sql": "SELECT 1 AS one"}, headers=auth).json() == [{"one": 1}]
