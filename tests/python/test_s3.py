"""End-to-end on S3-compatible storage: a real moto server process (with conditional PUT,
so concurrent Delta writers are safe without DynamoDB), two ledgerlake processes writing
the same tables, and the Python deltalake package reading them back."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest
import requests
from deltalake import DeltaTable

from conftest import demo_ndjson, free_port, keypair, kill_9_then_retry, run, signed


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
    a = server_factory(uri, state_dir=tmp_path / "state-a", env=s3)
    # Signed for the lake's deployment, which every process serving it shares.
    lines = demo_ndjson(a, 4000, seed=31).splitlines()
    setup = [line for line in lines if json.loads(line)["kind"] not in ("inference.completed", "fee.charged")]
    rest = [line for line in lines if line not in set(setup)]
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
        # Tables, not the lake's own files beside them (`_ledgerlake/`: the deployment id).
        tables = [t for p in listed.get("CommonPrefixes", []) if not (t := p["Prefix"].split("/")[1]).startswith("_")]
        assert "fee_charged" in tables, tables
        ids = []
        for table in tables:
            dt = DeltaTable(f"{uri}/{table}", storage_options=options)
            ids += dt.to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()
        return ids

    # The local state (index, keys) survives the kill, as it would on a real host.
    kill_9_then_retry(lambda: server_factory(uri, state_dir=tmp_path / "state", env=s3), stored_ids, events=12000)


def test_adapter_registered_on_s3_is_fetched_and_served(tmp_path, server_factory, s3):
    import openai
    from test_openai import BASE, write_peft_adapter
    local = write_peft_adapter(str(tmp_path / "adapter"), seed=5)
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(os.path.join(local, name), "lake", f"adapters/legal/{name}")
    server = server_factory(tmp_path / "lake", state_dir=tmp_path / "state", env=s3)
    builder = keypair()
    event = signed(server, builder["private_key"], {"kind": "model.registered", "event_id": "reg-legal-1", "model_id": "legal-lora",
                                                    "builder": builder["address"], "base_model": BASE,
                                                    "adapter_uri": "s3://lake/adapters/legal", "datanets": [],
                                                    "price_per_1k_input": "1000", "price_per_1k_output": "2000"})
    assert server.post(json.dumps(event)).status_code == 200
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    deadline = time.time() + 30
    while "legal-lora" not in [m.id for m in api.models.list().data]:
        assert time.time() < deadline, "the S3 adapter never became servable"
        time.sleep(0.3)
    fetched = list((tmp_path / "state" / "adapters" / "legal-lora").glob("*/adapter_model.safetensors"))
    assert len(fetched) == 1 and fetched[0].read_bytes() == open(os.path.join(local, "adapter_model.safetensors"), "rb").read()
    out = api.completions.create(model="legal-lora", prompt="The law", max_tokens=6, temperature=0)
    base = api.completions.create(model=BASE, prompt="The law", max_tokens=6, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert out.choices[0].text != base.choices[0].text

    # An admin loads an adapter straight from the object store, vLLM-style.
    poetry = write_peft_adapter(str(tmp_path / "poetry"), seed=9)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(os.path.join(poetry, name), "lake", f"adapters/poetry/{name}")
    load = lambda name, path: requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                            headers={"Authorization": f"Bearer {server.key}"}, timeout=30)
    r = load("poetry-lora", "s3://lake/adapters/poetry")
    assert r.status_code == 200, r.text
    assert (tmp_path / "state" / "adapters" / "poetry-lora" / "adapter_config.json").is_file()
    out = api.completions.create(model="poetry-lora", prompt="The law", max_tokens=6, temperature=0)
    assert out.model == "poetry-lora" and out.usage.completion_tokens >= 1
    r = load("nothing-lora", "s3://lake/adapters/nothing-there")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "nothing-lora" not in [m.id for m in api.models.list().data]


class Gate:
    """A TCP proxy in front of the S3 server that can be cut, as a lake outage: while cut,
    every open connection is reset and new ones are closed at once."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the S3 server is gone (the test is over)
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.up = False
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns = []

    def restore(self):
        self.up = True


def test_completions_during_a_lake_outage_wait_in_the_spool_and_land_once(tmp_path, server_factory, s3):
    import openai
    from test_openai import BASE
    real = s3["AWS_ENDPOINT_URL"]
    gate = Gate(int(real.rsplit(":", 1)[1]))
    uri, state = "s3://lake/outage", tmp_path / "state"
    server = server_factory(uri, state_dir=state, env={**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{gate.port}"})
    options = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": real, "AWS_ALLOW_HTTP": "true"}

    def inference_ids():
        try:
            t = DeltaTable(f"{uri}/inference_completed", storage_options=options)
        except Exception:  # not created yet
            return []
        return t.to_pyarrow_table(columns=["inference_id"]).column("inference_id").to_pylist()

    def wait_for(pred, what, timeout=120):
        deadline = time.time() + timeout
        while not pred():
            assert time.time() < deadline, what
            time.sleep(0.3)

    api = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    first = api.completions.create(model=BASE, prompt="Once", max_tokens=4, temperature=0)
    wait_for(lambda: first.id in inference_ids(), "the first completion lands")

    gate.cut()
    during = [api.completions.create(model=BASE, prompt=f"Day {i}", max_tokens=4, temperature=0).id for i in range(5)]
    spool = state / "spool"
    time.sleep(3)  # the forwarder tries, fails and backs off; nothing is lost meanwhile
    assert sorted(p.stem for p in spool.glob("*.json")) == sorted(during)
    assert inference_ids() == [first.id]

    gate.restore()
    wait_for(lambda: not list(spool.glob("*.json")), "the spool drains once the lake is back")
    ids = inference_ids()
    assert sorted(ids) == sorted([first.id] + during), "every completion lands, each once"
    fees = DeltaTable(f"{uri}/fee_charged", storage_options=options).to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()
    assert sorted(fees) == sorted(f"{i}:fee" for i in [first.id] + during)
    assert not list((spool / "quarantine").iterdir())


def test_storage_faults_are_503_with_retry_after_and_unavailable_over_flight(tmp_path, server_factory, s3):
    """Cutting the gate in front of the S3 server during a query, an ingest, a Flight query
    and an adapter fetch: each is a storage fault (503 + Retry-After, UNAVAILABLE), never a
    400 telling the client not to retry, and no message echoes the server's endpoints."""
    import pyarrow.flight as flight
    real = s3["AWS_ENDPOINT_URL"]
    gate = Gate(int(real.rsplit(":", 1)[1]))
    endpoint = f"http://127.0.0.1:{gate.port}"
    server = server_factory("s3://lake/faults", state_dir=tmp_path / "state", env={**s3, "AWS_ENDPOINT_URL": endpoint})
    lines = demo_ndjson(server, 300, seed=41)
    assert server.post(lines).status_code == 200
    during_outage = demo_ndjson(server, 50, seed=42)
    headers = {"Authorization": f"Bearer {server.key}"}
    sql = lambda q: requests.post(server.url + "/v1/sql", json={"sql": q}, headers=headers, timeout=120)
    assert sql("SELECT count(*) AS n FROM fee_charged").status_code == 200
    client = flight.FlightClient(server.flight_url)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {server.key}".encode())])

    gate.cut()
    internals = (str(gate.port), "127.0.0.1", "169.254")
    r = sql("SELECT count(*) AS n FROM fee_charged")
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    assert r.json()["error"]["code"] == "lake_unavailable"
    assert not any(i in r.text for i in internals), r.text
    r = server.post(during_outage)
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    assert not any(i in r.text for i in internals), r.text
    with pytest.raises(flight.FlightUnavailableError) as e:
        client.do_get(flight.Ticket(b"SELECT count(*) FROM fee_charged"), options).read_all()
    assert not any(i in str(e.value).split("gRPC")[0] for i in internals[:2]), str(e.value)
    r = requests.post(server.url + "/v1/load_lora_adapter", headers=headers, timeout=120,
                      json={"lora_name": "gone-lora", "lora_path": "s3://lake/adapters/gone"})
    assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
    assert not any(i in r.text for i in internals), r.text

    # Malformed input stays the client's fault during the outage, and only oversize is 413.
    r = requests.post(server.url + "/v1/sql", data="{not json", headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = server.post("{not json", content_type="application/json")
    assert r.status_code == 400, r.text

    gate.restore()
    deadline = time.time() + 60
    while sql("SELECT count(*) AS n FROM fee_charged").status_code != 200:
        assert time.time() < deadline, "queries work again once the lake is back"
        time.sleep(0.5)
    assert server.post(lines).json()["duplicates"] == 300


def test_an_object_store_path_without_credentials_does_not_echo_the_sdk(tmp_path, server_factory):
    # No credentials: the SDK would ask the instance metadata service, here pointed at a
    # closed loopback port (tests never leave loopback). The answer must not name it.
    closed = f"http://127.0.0.1:{free_port()}"
    env = {"AWS_METADATA_ENDPOINT": closed, "AWS_ENDPOINT_URL": closed, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    server = server_factory(tmp_path / "lake", state_dir=tmp_path / "state", env=env)
    r = requests.post(server.url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {server.key}"}, timeout=120,
                      json={"lora_name": "remote-lora", "lora_path": "s3://bucket/adapters/remote"})
    assert r.status_code in (400, 503), r.text
    assert r.json()["error"]["param"] in ("lora_path", None)
    assert closed.split("//")[1] not in r.text and "169.254" not in r.text, r.text
    assert "s3://bucket/adapters/remote" in r.json()["error"]["message"]


class HttpGate:
    """An HTTP/1.1 proxy in front of the S3 server that can let a request through and drop
    its response: S3 applied it, the writer never hears (a lost answer). `drop(pred, n)`
    arms it for the next `n` requests for which `pred(method, path)` holds."""

    def __init__(self, target_port):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.rules = []  # [pred, remaining]
        self.dropped = []
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, pred, n=1):
        with self.lock:
            self.rules.append([pred, n])

    def _should_drop(self, method, path):
        with self.lock:
            for rule in self.rules:
                if rule[1] > 0 and rule[0](method, path):
                    rule[1] -= 1
                    self.dropped.append((method, path))
                    return True
        return False

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    @staticmethod
    def _read_message(f, is_response, method=None):
        head = f.readline()
        if not head:
            return None
        lines = [head]
        headers = {}
        while True:
            line = f.readline()
            lines.append(line)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = f.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = f.readline()
                chunks.append(size_line)
                size = int(size_line.split(b";")[0].strip(), 16)
                data = f.read(size + 2)
                chunks.append(data)
                if size == 0:
                    break
            body = b"".join(chunks)
        return head, b"".join(lines), body

    def _serve(self, client):
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()  # the S3 server is gone (the test is ending): refuse like it would
            return
        cf, uf = client.makefile("rb"), upstream.makefile("rb")
        try:
            while True:
                req = self._read_message(cf, False)
                if req is None:
                    return
                head, raw, body = req
                method, path = head.decode("latin-1").split(" ")[:2]
                upstream.sendall(raw + body)
                resp = self._read_message(uf, True, method)
                if resp is None:
                    return
                if self._should_drop(method, path):
                    return  # S3 applied it; the answer is lost
                client.sendall(resp[1] + resp[2])
        except (OSError, ValueError):
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.close()
                except OSError:
                    pass


def test_a_commit_whose_answer_is_lost_is_stored_once(tmp_path, server_factory, s3):
    """The gate lets commit PUTs (and later checkpoint PUTs) through to S3 and drops their
    responses. Clients retry what was not acknowledged; every event is stored exactly once
    and the tables, checkpoint included, read back with Python deltalake."""
    real = s3["AWS_ENDPOINT_URL"]
    gate = HttpGate(int(real.rsplit(":", 1)[1]))
    uri = "s3://lake/lost"
    server = server_factory(uri, state_dir=tmp_path / "state", env={**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{gate.port}"})
    lines = demo_ndjson(server, 6000, seed=51).splitlines()
    setup = [line for line in lines if json.loads(line)["kind"] not in ("inference.completed", "fee.charged")]
    rest = [line for line in lines if line not in set(setup)]
    commit = lambda table: (lambda m, p: m == "PUT" and f"/{table}/_delta_log/" in p and p.split("?")[0].endswith(".json")
                            and "_commit_" not in p)
    gate.drop(commit("datanet_created"))
    gate.drop(commit("contribution_submitted"))

    def send(body):
        for _ in range(20):
            r = server.post(body)
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 503, r.text
            time.sleep(0.2)
        raise AssertionError("never acknowledged")

    send("\n".join(setup))
    # Enough commits to reach a checkpoint of fee_charged (every 100 commits), with
    # lost answers on commits and on the checkpoint's writes.
    batches = ["\n".join(rest[i:i + 40]) for i in range(0, len(rest), 40)]
    for i, b in enumerate(batches):
        if i in (10, 30, 70):
            gate.drop(commit("fee_charged"))
        if i == 90:
            gate.drop(lambda m, p: m == "PUT" and "/fee_charged/_delta_log/" in p and ("checkpoint" in p), n=3)
        send(b)
    assert [d for d in gate.dropped if "checkpoint" in d[1]], f"no checkpoint write was cut: {gate.dropped}"
    assert len(gate.dropped) >= 6, gate.dropped

    options = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": real, "AWS_ALLOW_HTTP": "true"}
    ids = []
    for table in ("datanet_created", "contribution_submitted", "contribution_reviewed", "inference_completed", "fee_charged"):
        ids += DeltaTable(f"{uri}/{table}", storage_options=options).to_pyarrow_table(columns=["event_id"]).column("event_id").to_pylist()
    expected = {json.loads(line)["event_id"] for line in lines}
    assert len(ids) == len(set(ids)), "no event is stored twice"
    assert set(ids) >= {json.loads(line)["event_id"] for line in lines if json.loads(line)["kind"] in
                        ("datanet.created", "contribution.submitted", "contribution.reviewed", "inference.completed", "fee.charged")}
    fee = DeltaTable(f"{uri}/fee_charged", storage_options=options)
    assert fee.version() >= 100
    # Everything sent is stored: a resend is all duplicates.
    again = send("\n".join(lines))
    assert again["accepted"] == 0 and again["duplicates"] == len(expected)
