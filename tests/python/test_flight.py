"""Arrow Flight SQL and Flight on `ledgerlake up --flight`, through the real clients: the ADBC
Flight SQL driver (DB-API) and pyarrow.flight."""
import json
import time

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pyarrow.flight as fl
import pytest
from deltalake import DeltaTable

from conftest import ADMIN, demo_ndjson, key_file, run


def fee_rows(srv, n, seed):
    """`fee.charged` events of a demo workload, as the JSON form's fields (no `kind`)."""
    rows = []
    for line in demo_ndjson(srv, n, seed=seed).splitlines():
        event = json.loads(line)
        if event.pop("kind") == "fee.charged":
            rows.append(event)
    return rows


def read_key(srv, role="read"):
    return json.loads(run("apikey", "--role", role, "--server", srv.url, "--api-key-file", key_file(ADMIN)))["key"]


def test_flight_sql_through_adbc(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    assert srv.post(demo_ndjson(srv, 3000, seed=5)).status_code == 200
    fees = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    model = fees.column("model_id")[0].as_py()
    want = sum(1 for m in fees.column("model_id").to_pylist() if m == model)

    # Basic auth through the Flight handshake, exchanged for a token.
    with flight_sql.connect(srv.flight_url, db_kwargs={"username": "analyst", "password": ADMIN}, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) AS n FROM fee_charged")
        assert cur.fetchone() == (fees.num_rows,)

        # A prepared statement with a parameter, run twice with different values.
        cur.execute("SELECT count(*) AS n FROM fee_charged WHERE model_id = ?", (model,))
        assert cur.fetchone() == (want,)
        cur.execute("SELECT count(*) AS n FROM fee_charged WHERE model_id = ?", ("no-such-model",))
        assert cur.fetchone() == (0,)

        cur.execute("SELECT event_id, amount FROM fee_charged ORDER BY event_id")
        table = cur.fetch_arrow_table()
        assert table.num_rows == fees.num_rows
        assert table.schema.field("amount").type == pa.decimal128(38, 0)
        assert sorted(table.column("event_id").to_pylist()) == sorted(fees.column("event_id").to_pylist())

        # Views and time travel through the same driver.
        cur.execute("SELECT sum(fees), sum(amount) FROM fees_by_model_day")
        n, amount = cur.fetchone()
        assert (n, int(amount)) == (fees.num_rows, sum(int(a) for a in fees.column("amount").to_pylist()))
        cur.execute("SELECT count(*) FROM at_version('fee_charged', 0)")
        assert cur.fetchone() == (DeltaTable(str(lake / "fee_charged"), version=0).to_pyarrow_table().num_rows,)

        # Metadata: catalogs, schemas, tables with their schemas, table types, SqlInfo.
        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        catalog = next(c for c in objects if c["catalog_name"] == "ledgerlake")
        public = next(s for s in catalog["catalog_db_schemas"] if s["db_schema_name"] == "public")
        tables = {t["table_name"]: t for t in public["db_schema_tables"]}
        assert {"fee_charged", "inference_completed", "contribution_submitted", "fees_by_model_day"} <= set(tables)
        assert tables["fee_charged"]["table_type"] == "TABLE"
        assert tables["fees_by_model_day"]["table_type"] == "VIEW"
        assert "amount" in [c["column_name"] for c in tables["fee_charged"]["table_columns"]]
        schema = conn.adbc_get_table_schema("fee_charged", catalog_filter="ledgerlake", db_schema_filter="public")
        assert schema.field("amount").type == pa.decimal128(38, 0)
        assert set(conn.adbc_get_table_types()) == {"TABLE", "VIEW"}
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "ledgerlake"

        # Writes are refused with the engine's message; the connection keeps working.
        with pytest.raises(flight_sql.Error, match="read-only"):
            cur.execute("DELETE FROM fee_charged")
        with pytest.raises(flight_sql.Error, match="(?i)sql"):
            cur.execute("SELEC 1")
        stmt = cur.adbc_statement  # ExecuteUpdate (CommandStatementUpdate) is refused too
        stmt.set_sql_query("DELETE FROM fee_charged")
        with pytest.raises(flight_sql.Error, match="read-only"):
            stmt.execute_update()
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == fees.num_rows

    # An API key as a bearer header, no handshake; a read key may query.
    reader = read_key(srv)
    header = {adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {reader}"}
    with flight_sql.connect(srv.flight_url, db_kwargs=header, autocommit=True) as conn:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM inference_completed")
        assert cur.fetchone()[0] > 0

    # Bulk ingest of events (Flight SQL CommandStatementIngest): fees are service facts, which
    # an admin (or service) key may write.
    new = pa.Table.from_pylist(fee_rows(srv, 600, seed=21))
    with flight_sql.connect(srv.flight_url, db_kwargs={"username": "loader", "password": ADMIN}, autocommit=True) as conn:
        cur = conn.cursor()
        assert cur.adbc_ingest("fee_charged", new, mode="append") == new.num_rows
        assert cur.adbc_ingest("fee_charged", new, mode="append") == 0  # all duplicates
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == fees.num_rows + new.num_rows
    # Any key may send events, but what it may cause is decided per event: a read key's fees
    # are refused, naming the rule, and its batch stores nothing.
    more = pa.Table.from_pylist(fee_rows(srv, 200, seed=22))
    with flight_sql.connect(srv.flight_url, db_kwargs=header, autocommit=True) as conn:
        with pytest.raises(flight_sql.Error, match="this key is read"):
            conn.cursor().adbc_ingest("fee_charged", more, mode="append")
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == fees.num_rows + new.num_rows

    # Wrong credentials are refused at connect or first call.
    with pytest.raises(flight_sql.Error, match="(?i)unauthenticated|api key"):
        with flight_sql.connect(srv.flight_url, db_kwargs={"username": "x", "password": "wrong"}, autocommit=True) as conn:
            conn.cursor().execute("SELECT 1")


def test_flight_streams_tables_and_takes_events(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    assert srv.post(demo_ndjson(srv, 3000, seed=7)).status_code == 200
    fees = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    client = fl.FlightClient(srv.flight_url)

    # Unauthenticated calls are refused on every route.
    descriptor = fl.FlightDescriptor.for_path("fee_charged")
    for call in (
        lambda: list(client.list_flights()),
        lambda: client.get_flight_info(descriptor),
        lambda: client.get_schema(descriptor),
        lambda: client.do_get(fl.Ticket(b"fee_charged")).read_all(),
        lambda: list(client.list_actions()),
        lambda: list(client.do_action(fl.Action("CancelFlightInfo", b""))),
    ):
        # pyarrow raises FlightUnauthenticatedError, or OSError from inside a result stream.
        with pytest.raises((fl.FlightUnauthenticatedError, OSError), match="(?i)unauthenticated"):
            call()
    with pytest.raises(fl.FlightUnauthenticatedError):
        client.authenticate_basic_token("analyst", "not-a-key")
    bad = fl.FlightCallOptions(headers=[(b"authorization", b"Bearer not-a-key")])
    with pytest.raises(fl.FlightUnauthenticatedError):
        client.get_flight_info(descriptor, bad)

    opts = fl.FlightCallOptions(headers=[client.authenticate_basic_token("analyst", ADMIN)])

    # ListFlights: every table, with its row count.
    flights = {f.descriptor.path[0].decode(): f for f in client.list_flights(options=opts)}
    assert {"fee_charged", "inference_completed", "datanet_created", "stake_changed"} <= set(flights)
    assert flights["fee_charged"].total_records == fees.num_rows

    # GetFlightInfo + DoGet of a table, now and at a version.
    info = client.get_flight_info(descriptor, opts)
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.num_rows == fees.num_rows and table.schema == info.schema
    assert sorted(table.column("event_id").to_pylist()) == sorted(fees.column("event_id").to_pylist())
    assert client.get_schema(descriptor, opts).schema == info.schema
    v0 = DeltaTable(str(lake / "fee_charged"), version=0).to_pyarrow_table()
    info0 = client.get_flight_info(fl.FlightDescriptor.for_path("fee_charged", "0"), opts)
    assert client.do_get(info0.endpoints[0].ticket, opts).read_all().num_rows == v0.num_rows

    # A query as a command descriptor, and hand-written tickets.
    sql = "SELECT model_id, count(*) AS n FROM fee_charged GROUP BY model_id ORDER BY model_id"
    qinfo = client.get_flight_info(fl.FlightDescriptor.for_command(sql), opts)
    counts = client.do_get(qinfo.endpoints[0].ticket, opts).read_all()
    assert sum(counts.column("n").to_pylist()) == fees.num_rows
    assert client.do_get(fl.Ticket(b'{"table": "fee_charged", "version": 0}'), opts).read_all().num_rows == v0.num_rows
    assert client.do_get(fl.Ticket(sql.encode()), opts).read_all() == counts
    with pytest.raises(KeyError, match="no table"):  # NOT_FOUND
        client.get_flight_info(fl.FlightDescriptor.for_path("nope"), opts)
    with pytest.raises(pa.ArrowInvalid, match="read-only"):  # INVALID_ARGUMENT
        client.do_get(fl.Ticket(b"DROP TABLE fee_charged"), opts).read_all()

    # DoPut of events as Arrow batches: one receipt per batch, exactly once.
    new = pa.Table.from_pylist(fee_rows(srv, 3000, seed=8))
    receipts = put(client, fl.FlightDescriptor.for_path("fee.charged"), new, opts, chunk=100)
    assert len(receipts) == -(-new.num_rows // 100)
    assert sum(r["accepted"] for r in receipts) == new.num_rows and all(not r["errors"] for r in receipts)
    stored = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table()
    assert stored.num_rows == fees.num_rows + new.num_rows
    again = put(client, fl.FlightDescriptor.for_path("fee_charged"), new, opts, chunk=1000)
    assert sum(r["duplicates"] for r in again) == new.num_rows and sum(r["accepted"] for r in again) == 0

    # A bad row is named in its batch's receipt; with "atomic" its batch stores nothing.
    rows = fee_rows(srv, 400, seed=9)
    rows[1]["amount"] = "-5"
    receipts = put(client, fl.FlightDescriptor.for_path("fee.charged"), pa.Table.from_pylist(rows), opts)
    assert receipts[0]["accepted"] == len(rows) - 1
    assert [(e["index"], e["field"]) for e in receipts[0]["errors"]] == [(1, "amount")]
    rows = fee_rows(srv, 400, seed=10)
    rows[0]["model_id"] = "Not A Slug!"
    receipts = put(client, fl.FlightDescriptor.for_path("fee.charged", "atomic"), pa.Table.from_pylist(rows), opts)
    assert receipts[0]["accepted"] == 0 and receipts[0]["errors"][0]["index"] == 0
    # Rows that carry their kind go to ["events"].
    rows = fee_rows(srv, 400, seed=12)
    for r in rows:
        r["kind"] = "fee.charged"
    receipts = put(client, fl.FlightDescriptor.for_path("events"), pa.Table.from_pylist(rows), opts)
    assert receipts[0]["accepted"] == len(rows)
    total = DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows

    # Any key may DoPut, but fees are service facts: a read key's are refused row by row,
    # naming the kind, and nothing is stored.
    reader = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {read_key(srv)}".encode())])
    assert client.do_get(fl.Ticket(b"fee_charged"), reader).read_all().num_rows == total
    refused = pa.Table.from_pylist(fee_rows(srv, 200, seed=13))
    receipts = put(client, fl.FlightDescriptor.for_path("fee.charged"), refused, reader)
    assert sum(r["accepted"] for r in receipts) == 0 and sum(len(r["errors"]) for r in receipts) == refused.num_rows, receipts
    assert all(e["field"] == "kind" and "this key is read" in e["message"] for r in receipts for e in r["errors"])
    with pytest.raises(KeyError, match="no event kind"):  # NOT_FOUND
        put(client, fl.FlightDescriptor.for_path("nope"), new, opts)
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == total
    # A service key's fees come with the completions they bill (test_attacks): alone, each
    # is refused naming its inference.
    service = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {read_key(srv, 'service')}".encode())])
    receipts = put(client, fl.FlightDescriptor.for_path("fee.charged"), refused, service)
    assert sum(r["accepted"] for r in receipts) == 0, receipts
    assert {e["field"] for r in receipts for e in r["errors"]} == {"inference_id"}, receipts
    assert DeltaTable(str(lake / "fee_charged")).to_pyarrow_table().num_rows == total


def put(client, descriptor, table, options, chunk=None):
    """DoPut of `table` in batches of `chunk` rows; returns the JSON receipts."""
    writer, reader = client.do_put(descriptor, table.schema, options)
    receipts = []
    with writer:
        for batch in table.to_batches(max_chunksize=chunk):
            writer.write_batch(batch)
            receipts.append(json.loads(reader.read().to_pybytes()))
        writer.done_writing()
    return receipts


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_flight_query_cancellation(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    assert srv.post(demo_ndjson(srv, 3000, seed=5)).status_code == 200
    client = fl.FlightClient(srv.flight_url)
    opts = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {ADMIN}".encode())])

    # A query that would stream for hours: rows of a three-way cross join.
    sql = "SELECT a.event_id, b.event_id AS b, c.event_id AS c FROM fee_charged a, fee_charged b, fee_charged c"
    info = client.get_flight_info(fl.FlightDescriptor.for_command(sql), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    assert reader.read_chunk().data.num_rows > 0

    # CancelFlightInfo (a CancelFlightInfoRequest holding the FlightInfo) answers CANCELLED.
    info_bytes = info.serialize()
    body = b"\x0a" + varint(len(info_bytes)) + info_bytes
    results = list(client.do_action(fl.Action("CancelFlightInfo", body), opts))
    assert results[0].body.to_pybytes() == b"\x08\x01"  # status = CANCEL_STATUS_CANCELLED

    # The stream then ends with CANCELLED, not with a short result.
    deadline = time.time() + 60
    with pytest.raises(fl.FlightCancelledError):
        while time.time() < deadline:
            reader.read_chunk()
    assert time.time() < deadline

    # The server keeps serving.
    t = client.do_get(fl.Ticket(b"SELECT count(*) AS n FROM fee_charged"), opts).read_all()
    assert t.column("n")[0].as_py() > 0

    # A query cancelled before its DoGet never starts.
    info = client.get_flight_info(fl.FlightDescriptor.for_command("SELECT 1"), opts)
    info_bytes = info.serialize()
    list(client.do_action(fl.Action("CancelFlightInfo", b"\x0a" + varint(len(info_bytes)) + info_bytes), opts))
    with pytest.raises(fl.FlightCancelledError):
        client.do_get(info.endpoints[0].ticket, opts).read_all()


def test_flight_query_timeout_is_deadline_exceeded(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake, env={"LEDGERLAKE_QUERY_TIMEOUT_S": "1"})
    assert srv.post(demo_ndjson(srv, 3000, seed=5)).status_code == 200
    client = fl.FlightClient(srv.flight_url)
    opts = fl.FlightCallOptions(headers=[(b"authorization", f"Bearer {ADMIN}".encode())])
    endless = b"SELECT count(*) FROM fee_charged a, fee_charged b, fee_charged c WHERE a.amount + b.amount > c.amount"
    with pytest.raises(fl.FlightTimedOutError, match="time limit"):
        client.do_get(fl.Ticket(endless), opts).read_all()
    # The server keeps serving.
    assert client.do_get(fl.Ticket(b"SELECT 1 AS one"), opts).read_all().column("one")[0].as_py() == 1
