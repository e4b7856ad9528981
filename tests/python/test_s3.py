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


def test_adapter_registered_on_s3_is_fetched_and_served(tmp_path, server_factory, s3):
    import openai
    from test_openai import BASE, write_peft_adapter
    local = write_peft_adapter(str(tmp_path / "adapter"), seed=5)
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(os.path.join(local, name), "lake", f"adapters/legal/{name}")
    server = server_factory(tmp_path / "lake", state_dir=tmp_path / "state", env=s3)
    event = {"kind": "model.registered", "event_id": "reg-legal-1", "event_time": "2026-11-24T00:00:00Z",
             "model_id": "legal-lora", "builder": "0x352E987bf9Af2B78E403367DF394C105ef46923C",
             "base_model": BASE, "adapter_uri": "s3://lake/adapters/legal", "datanets": [],
             "price_per_1k_input": "1000", "price_per_1k_output": "2000"}
    assert server.post(json.dumps(event)).status_code == 200
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    deadline = time.time() + 30
    while "legal-lora" not in [m.id for m in api.models.list().data]:
        assert time.time() < deadline, "the S3 adapter never became servable"
        time.sleep(0.3)
    fetched = tmp_path / "state" / "adapters" / "legal-lora" / "adapter_model.safetensors"
    assert fetched.read_bytes() == open(os.path.join(local, "adapter_model.safetensors"), "rb").read()
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
            upstream = socket.create_connection(self.target)
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
    assert not (spool / "rejected").exists()
