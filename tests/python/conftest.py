"""Fixtures that run the real `ledgerlake` binary, as a user would."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

BIN = os.environ.get("LEDGERLAKE_BIN", os.path.expanduser("~/.cache/ledgerlake-target/debug/ledgerlake"))
ADMIN = "e2e-admin-key-0123456789abcdef"
KEY_DIR = tempfile.mkdtemp(prefix="ledgerlake-keys-")


def key_file(secret):
    """A 0600 file holding `secret` (an API or private key): ledgerlake takes keys from files
    or the environment, never from its command line."""
    import hashlib
    path = os.path.join(KEY_DIR, hashlib.sha256(secret.encode()).hexdigest()[:16] + ".key")
    if not os.path.exists(path):
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.replace(path + ".tmp", path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args, env=None, **kw):
    """Runs a ledgerlake command to completion and returns its stdout."""
    out = subprocess.run([BIN, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600, **kw)
    if out.returncode != 0:
        raise AssertionError(f"ledgerlake {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


class Server:
    """A `ledgerlake up` process on a free port; `kill()` is kill -9."""

    def __init__(self, data, state_dir=None, admin_key=ADMIN, env=None, cwd=None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flight_port = free_port()
        self.flight_url = f"grpc://127.0.0.1:{self.flight_port}"
        args = [BIN, "up", "--data", str(data), "--http", f"127.0.0.1:{self.port}",
                "--flight", f"127.0.0.1:{self.flight_port}", *extra]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        if admin_key is not None:
            args += ["--admin-key-file", key_file(admin_key)]
        self.key = admin_key
        # up's attribution job writes rows of its own; tests that count what they stored run
        # without it, and the attribution tests turn it on.
        full_env = {"LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "0",
                    # Adapters are read only from the adapter roots: the tests keep theirs in
                    # temp directories and the S3 tests' buckets (test_attacks narrows them).
                    "LEDGERLAKE_ADAPTER_ROOTS": f"{tempfile.gettempdir()},s3://lake/adapters,s3://bucket/adapters",
                    **os.environ, **(env or {})}
        if admin_key is None:
            full_env.pop("LEDGERLAKE_ADMIN_KEY", None)
        # stderr goes to a file: a pipe nobody reads would block the server once full.
        self.log = tempfile.NamedTemporaryFile(prefix="ledgerlake-up-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env, cwd=cwd)
        self.stdout = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ledgerlake up exited {self.proc.returncode}: {open(self.log.name).read()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            raise AssertionError("ledgerlake up did not become healthy")
        # Everything `up` prints comes before it serves.
        while True:
            line = self.proc.stdout.readline()
            self.stdout += line
            if not line or "admin key" in line:
                break
        if self.key is None:
            # A generated admin key is never printed: `up` names the 0600 file it is in.
            m = re.search(r"admin key: generated, in (\S+)", self.stdout) or re.search(r"admin key: in (\S+)", self.stdout)
            if m:
                self.key = open(m.group(1)).read().strip()

    def post(self, body, content_type="application/x-ndjson", params=None, key=None, timeout=60):
        return requests.post(self.url + "/v1/events", data=body, params=params, timeout=timeout,
                             headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": content_type})

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server_factory():
    servers = []

    def make(*args, **kw):
        s = Server(*args, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def demo_ndjson(srv, n, seed=1):
    """The demo workload of `seed`, its participant events signed for `srv`'s deployment
    and timed from now."""
    return run("demo", "--ndjson", str(n), "--seed", str(seed), "--server", srv.url)


def now():
    """The current time, RFC 3339: participant events are signed when they happen."""
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def signed(srv, private_key, event):
    """`event` (a dict with `kind`) signed by `private_key` for `srv`'s deployment (EIP-712,
    through `ledgerlake sign event`); `event_id` and `event_time` are filled in if absent."""
    return json.loads(run("sign", "--key-file", key_file(private_key), "--server", srv.url, "event", json.dumps(event)))["event"]


def kill_9_then_retry(start_server, stored_ids, events=30000):
    """Four clients post batches; the server is killed with SIGKILL mid-stream. Every
    acknowledged event must be stored, every table readable; after a restart the clients
    resend everything and no event is stored twice."""
    srv = start_server()
    lines = demo_ndjson(srv, events, seed=11).splitlines()
    batches = ["\n".join(lines[i:i + 500]) for i in range(0, len(lines), 500)]
    acked, stop = [], threading.Event()

    def client(start):
        for i in range(start, len(batches), 4):
            if stop.is_set():
                return
            try:
                r = srv.post(batches[i])
            except Exception:
                return
            if r.status_code == 200:
                acked.append(i)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    # Kill while requests are in flight: once a few batches are acknowledged.
    deadline = time.time() + 120
    while len(acked) < 6 and time.time() < deadline:
        time.sleep(0.01)
    srv.kill()
    stop.set()
    for t in threads:
        t.join()
    assert acked, "nothing was acknowledged before the kill"
    assert len(acked) < len(batches), "everything was acknowledged before the kill: it proved nothing"

    stored = set(stored_ids())
    for i in acked:
        for line in batches[i].splitlines():
            assert json.loads(line)["event_id"] in stored

    srv2 = start_server()
    for b in batches:
        r = srv2.post(b)
        assert r.status_code == 200, r.text
    ids = stored_ids()
    assert len(ids) == len(set(ids)) == len(lines)


def keypair():
    """A fresh signing key, made by `ledgerlake keys new --out`: {"address", "key_file",
    "private_key"}."""
    path = os.path.join(KEY_DIR, f"signer-{os.urandom(8).hex()}.key")
    made = dict(line.split(": ") for line in run("keys", "new", "--out", path).splitlines())
    assert made["key_file"] == path and oct(os.stat(path).st_mode & 0o777) == "0o600"
    return {**made, "private_key": open(path).read().strip()}


def approved_datanet(srv, lake, tmp_path, owner, datanet, texts, visibility="public"):
    """Creates `datanet` (owned by `owner`), contributes one file per text through
    `ledgerlake contribute` and approves every contribution; returns their ids."""
    from deltalake import DeltaTable

    created = signed(srv, owner["private_key"], {"kind": "datanet.created", "event_id": f"d-{datanet}", "datanet_id": datanet,
                                                 "owner": owner["address"], "name": datanet.title(), "license": "CC0-1.0",
                                                 "visibility": visibility})
    assert srv.post(json.dumps(created), content_type="application/json").json()["accepted"] == 1
    files = []
    for i, text in enumerate(texts):
        files.append(str(tmp_path / f"{datanet}-{i:03d}.txt"))
        open(files[-1], "w").write(text + "\n")
    run("contribute", "--datanet", datanet, "--key-file", key_file(owner["private_key"]), "--server", srv.url, "--api-key-file", key_file(ADMIN), *files)
    rows = DeltaTable(str(lake / "contribution_submitted")).to_pyarrow_table().to_pylist()
    ids = sorted(r["contribution_id"] for r in rows if r["datanet_id"] == datanet)
    assert len(ids) == len(texts)
    reviews = []
    for cid in ids:
        out = json.loads(run("sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "review", "--contribution", cid,
                             "--datanet", datanet, "--verdict", "approved", "--event-id", f"rev-{cid[2:18]}"))
        reviews.append(out["event"])
    assert srv.post("\n".join(json.dumps(r) for r in reviews)).json()["accepted"] == len(reviews)
    return ids


# Ganache's deterministic accounts (`--wallet.deterministic`): well-known test keys.
GANACHE_KEYS = [
    "0x4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d",
    "0x6cbed15c793ce57650b9877cf6fa156fbef513c4e6134f022a85b1ffdd59b2a1",
    "0x6370fd033278c143179d81c5526140625662b8daa446c22ee2d73db3707e620c",
    "0x646f1ce2fdad0e6deeeb5c7e8e5543bdde65e86029e2fd9fc169899c440a7913",
]


def address_of(private_key):
    from eth_account import Account
    return Account.from_key(private_key).address


def evm_rpc(rpc, method, params):
    """One JSON-RPC call to the node at `rpc`; an error raises EvmError."""
    out = requests.post(rpc, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, timeout=60).json()
    if "error" in out:
        raise EvmError(out["error"])
    return out["result"]


class EvmError(Exception):
    """A call or transaction the node refused; `name` is the contract's custom error."""

    def __init__(self, error):
        super().__init__(str(error))
        data = error.get("data")
        if isinstance(data, dict):
            data = data.get("result") or data.get("data")
        self.data = data if isinstance(data, str) else ""

    def is_error(self, signature):
        from eth_utils import keccak
        return self.data.startswith("0x" + keccak(text=signature)[:4].hex())


def _calldata(signature, args):
    from eth_abi import encode
    from eth_utils import keccak
    types = signature[signature.index("(") + 1:-1]
    types = [t for t in types.split(",") if t]
    return "0x" + (keccak(text=signature)[:4] + encode(types, args)).hex()


def evm_call(rpc, to, signature, args=(), returns=("uint256",)):
    """`to.signature(args)` read with eth_call, decoded as `returns`."""
    from eth_abi import decode
    out = evm_rpc(rpc, "eth_call", [{"to": to, "data": _calldata(signature, list(args))}, "latest"])
    values = decode(list(returns), bytes.fromhex(out[2:]))
    return values[0] if len(values) == 1 else values


def evm_send(rpc, private_key, to, signature, args=()):
    """Sends `to.signature(args)` from `private_key` and waits for it; a call the contract
    would revert raises EvmError (checked with eth_call first) and sends nothing."""
    from eth_account import Account
    from eth_utils import to_checksum_address
    sender = Account.from_key(private_key)
    to = to_checksum_address(to)
    tx = {"from": sender.address, "to": to, "data": _calldata(signature, list(args))}
    evm_rpc(rpc, "eth_call", [tx, "latest"])
    signed_tx = sender.sign_transaction({
        "to": to, "data": tx["data"], "value": 0, "gas": 500_000, "gasPrice": int(evm_rpc(rpc, "eth_gasPrice", []), 16),
        "nonce": int(evm_rpc(rpc, "eth_getTransactionCount", [sender.address, "pending"]), 16),
        "chainId": int(evm_rpc(rpc, "eth_chainId", []), 16)})
    raw = getattr(signed_tx, "raw_transaction", None) or signed_tx.rawTransaction
    txid = evm_rpc(rpc, "eth_sendRawTransaction", ["0x" + raw.hex().removeprefix("0x")])
    deadline = time.time() + 60
    while time.time() < deadline:
        receipt = evm_rpc(rpc, "eth_getTransactionReceipt", [txid])
        if receipt:
            assert int(receipt["status"], 16) == 1, receipt
            return receipt
        time.sleep(0.1)
    raise AssertionError(f"{txid} was not mined")


def deploy_contracts(rpc, cooldown_s=3600):
    """`ledgerlake chain deploy` from ganache's first account, the supply to the second
    (the treasury), anchoring by the third (the server's key), 10^26 OPEN base units funded to the
    distributor by the treasury (`chain fund`)."""
    deployer, treasury, anchorer = GANACHE_KEYS[:3]
    deployed = json.loads(run("chain", "deploy", "--rpc", rpc, "--key-file", key_file(deployer),
                              "--treasury", address_of(treasury), "--anchorer", address_of(anchorer), "--cooldown-s", str(cooldown_s)))
    run("chain", "fund", "--rpc", rpc, "--key-file", key_file(treasury), "--distributor", deployed["distributor"],
        "--amount", str(10**26))
    return deployed
CHAIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "chain")


@pytest.fixture
def ganache():
    """A local EVM node from the npm registry (ganache), on a free loopback port."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="ganache-", suffix=".log", delete=False)
    proc = subprocess.Popen([os.path.join(CHAIN_DIR, "node_modules", ".bin", "ganache"), "--host", "127.0.0.1", "--port", str(port),
                             "--wallet.deterministic", "--chain.chainId", "1337", "--logging.quiet"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.2)
    else:
        proc.kill()
        raise AssertionError(f"ganache did not start: {open(log.name).read()}")
    yield url
    proc.kill()
    proc.wait()
