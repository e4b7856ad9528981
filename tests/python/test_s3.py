"""End-to-end on S3-compatible storage: a real moto server process (with conditional PUT,
so concurrent Delta writers are safe without DynamoDB), two ledgerlake processes writing
the same tables, and the Python deltalake package reading them back."""
import json
import os
import subprocess
import sys
import threading
import time

import boto3
import pytest
import requests
from deltalake import DeltaTable

from conftest import demo_ndjson, free_port, kill_9_then_retry, run


@pytest.fixture
def s3():
    port = free_port()
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true",
    }
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="lake")
    yield env
    proc.terminate()
    proc.wait()


def test_two_processes_on_s3(tmp_path, server_factory, s3):
    uri = "s3://lake/prod"
    lines = demo_ndjson(4000, seed=31).splitlines()
    setup = [line for line in lines if json.loads(line)["kind"] not in ("inference.completed", "fee.charged")]
    rest = [line for line in lines if line not in set(setup)]
    a = server_factory(uri, state_dir=tmp_path / "state-a", env=s3)
    assert a.post("\n".join(setup)).json()["accepted"] == len(setup)
    b = server_factory(uri, state_dir=tmp_path / "state-b", env=s3)
    chunks = ["\n".join(rest[i:i + 200]) for i in range(0, len(rest), 200)]
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
    assert sum(r["duplicates"] for r in results) == len(rest)

    options = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true"}
    ids = []
    for table in ("inference_completed", "fee_charged", "datanet_created", "contribution_submitted"):
        ids += DeltaTable(f"{uri}/{table}", storage_options=options).to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()
    assert len(ids) == len(set(ids))
    listing = run("tables", "--data", uri, env=s3)
    assert sum(int(line.split()[3]) for line in listing.splitlines()[1:]) == len(lines), listing

    # A restart on S3 with a fresh local state rebuilds the index from the tables.
    a.stop()
    c = server_factory(uri, state_dir=tmp_path / "state-c", env=s3)
    r = c.post("\n".join(lines)).json()
    assert (r["accepted"], r["duplicates"]) == (0, len(lines))


def test_kill_9_on_s3(tmp_path, server_factory, s3):
    uri = "s3://lake/crash"
    options = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true"}
    s3_client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                             aws_secret_access_key="testing", region_name="us-east-1")

    def stored_ids():
        listed = s3_client.list_objects_v2(Bucket="lake", Prefix="crash/", Delimiter="/")
        tables = [p["Prefix"].split("/")[1] for p in listed.get("CommonPrefixes", [])]
        assert "fee_charged" in tables, tables
        ids = []
        for table in tables:
            dt = DeltaTable(f"{uri}/{table}", storage_options=options)
            ids += dt.to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()
        return ids

    # The local state (index, keys) survives the kill, as it would on a real host.
    kill_9_then_retry(lambda: server_factory(uri, state_dir=tmp_path / "state", env=s3), stored_ids, events=12000)
