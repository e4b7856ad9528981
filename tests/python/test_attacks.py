"""The attack suite of issue 27: what an attacker with an ordinary key tried against the
real binary, one test per item, each failing on the main before the fix. In each the
attacker ends with nothing (no reward row, no credit, no data it may not have), honest
users keep everything, and the epochs keep closing.

Signatures here are made two ways: by `ledgerlake sign` (conftest.signed) and by Python's
eth_account from the typed structs in docs/events.md alone, so the EIP-712 encoding is
checked against a standard implementation."""
import datetime
import json
import os
import stat
import subprocess
import time

import pytest
import requests
from deltalake import DeltaTable
from eth_account import Account
from eth_account.messages import encode_typed_data

from conftest import (ADMIN, BIN, GANACHE_KEYS, EvmError, address_of, deploy_contracts, evm_call, evm_rpc, evm_send, key_file, keypair, now, run,
                      signed)
from recompute_epoch import recompute

# Five-second epochs from a genesis in the past: an answer's epoch ends seconds later.
ENV = {"LEDGERLAKE_EPOCH_GENESIS": "2026-01-01T00:00:00Z", "LEDGERLAKE_EPOCH_LENGTH_S": "5", "LEDGERLAKE_EPOCH_GRACE_S": "0"}
MAX_AMOUNT = 10**38 - 1

# The typed structs of docs/events.md ("The typed structs"), written out by hand.
STRUCTS = {
    "datanet.updated": ("DatanetUpdated", [("eventId", "string"), ("eventTime", "int64"), ("datanetId", "string"), ("updatedBy", "address"),
                                           ("name", "string"), ("description", "string"), ("license", "string"), ("status", "string"),
                                           ("visibility", "string")]),
    "contribution.reviewed": ("ContributionReviewed", [("eventId", "string"), ("eventTime", "int64"), ("contributionId", "bytes32"),
                                                       ("datanetId", "string"), ("reviewer", "address"), ("verdict", "string"),
                                                       ("reason", "string")]),
    "access.requested": ("AccessRequested", [("eventId", "string"), ("eventTime", "int64"), ("datanetId", "string"), ("builder", "address"),
                                             ("message", "string")]),
    "access.revoked": ("AccessRevoked", [("eventId", "string"), ("eventTime", "int64"), ("datanetId", "string"), ("builder", "address"),
                                         ("revokedBy", "address")]),
}


def camel(name):
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def micros(rfc3339):
    t = datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return (t - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)


def eth_sign(srv, private_key, event, deployment=None):
    """Signs `event` with eth_account from the documented struct and the server's domain."""
    deployment = deployment or requests.get(srv.url + "/v1/deployment", timeout=30).json()
    primary, members = STRUCTS[event["kind"]]
    message = {}
    for name, typ in members:
        field = {"eventId": "event_id", "eventTime": "event_time", "updatedBy": "updated_by", "revokedBy": "revoked_by",
                 "datanetId": "datanet_id", "contributionId": "contribution_id"}.get(name, name)
        value = event.get(field)
        if name == "eventTime":
            value = micros(value)
        elif typ == "bytes32":
            value = "0x" + value
        elif value is None:
            value = ""
        message[name] = value
    domain = deployment["eip712_domain"]
    domain_types = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}]
    if "chainId" in domain:
        domain_types.append({"name": "chainId", "type": "uint256"})
    domain_types.append({"name": "salt", "type": "bytes32"})
    typed = {"types": {"EIP712Domain": domain_types, primary: [{"name": n, "type": t} for n, t in members]},
             "primaryType": primary, "domain": domain, "message": message}
    sig = Account.sign_message(encode_typed_data(full_message=typed), private_key).signature.hex()
    return {**event, "signature": "0x" + sig.removeprefix("0x")}


def post(srv, events, key=ADMIN, content_type="application/x-ndjson", atomic=False):
    body = "\n".join(json.dumps(e) for e in events)
    return requests.post(srv.url + "/v1/events", data=body, timeout=60, params={"atomic": "true"} if atomic else None,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})


def refused(r, *fields):
    assert r.status_code == 422, r.text
    got = [e["field"] for e in r.json()["errors"]]
    assert got == list(fields), r.text
    assert r.json()["accepted"] == 0, r.text


def create_datanet(srv, owner, name, visibility):
    """`owner` (a keypair) creates datanet `name`, signed for `srv`'s deployment."""
    created = signed(srv, owner["private_key"], {"kind": "datanet.created", "datanet_id": name, "owner": owner["address"],
                                                  "name": name.title(), "license": "CC0-1.0", "visibility": visibility})
    assert post(srv, [created]).status_code == 200, "the owner's own datanet"


def apikey(srv, role, address=None):
    args = ["apikey", "--role", role, "--server", srv.url, "--api-key-file", key_file(ADMIN)]
    if address:
        args += ["--address", address]
    return json.loads(run(*args))["key"]


def table(lake, name):
    path = lake / name
    if not (path / "_delta_log").exists():
        return []
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist()


def epoch_of(t):
    genesis = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return int((t - genesis).total_seconds()) // 5


def wait_for_window_end(n):
    """Polls the clock until epoch `n`'s window has ended (the condition closing needs)."""
    end = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=5 * (n + 1))
    while datetime.datetime.now(datetime.timezone.utc) < end:
        time.sleep(0.2)


def close_when_due(srv, n, empty=None):
    """Waits for epoch `n`'s window to end, then closes it with the CLI."""
    wait_for_window_end(n)
    args = ["epoch", "close", str(n), "--server", srv.url, "--api-key-file", key_file(ADMIN)]
    if empty:
        args += ["--empty", empty]
    return json.loads(run(*args))["epoch"]


def completion(srv, key=ADMIN):
    r = requests.post(srv.url + "/v1/completions", timeout=120, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "ledgerlake-base", "prompt": "It was a fine morning, and", "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def wait_for_fee(lake, inference_id):
    deadline = time.time() + 60
    while time.time() < deadline:
        if any(f["inference_id"] == inference_id for f in table(lake, "fee_charged")):
            return
        time.sleep(0.2)
    raise AssertionError(f"the fee of {inference_id} never landed")


def test_item1_an_ordinary_key_cannot_mint_rewards(tmp_path, server_factory):
    """Registering the base model as your own, staking on it, posting fees, forging
    attribution rows and another staker's unstake: every one refused, over HTTP and Flight,
    and the next epoch pays the attacker nothing."""
    import pyarrow as pa
    import pyarrow.flight as flight

    lake = tmp_path / "lake"
    srv = server_factory(lake, env=ENV)
    attacker = keypair()
    honest_staker = keypair()["address"]
    for role in ("ingest", "read"):
        key = apikey(srv, role)
        reg = signed(srv, attacker["private_key"], {"kind": "model.registered", "model_id": "ledgerlake-base", "builder": attacker["address"],
                                                     "base_model": "ledgerlake-base", "adapter_uri": "adapters/x",
                                                     "price_per_1k_input": "1", "price_per_1k_output": "1"})
        refused(post(srv, [reg], key), "model_id")
        t = now()
        stake = {"kind": "stake.changed", "event_id": f"st-{role}", "event_time": t, "staker": attacker["address"],
                 "model_id": "ledgerlake-base", "action": "stake", "amount": "1"}
        unstake = {**stake, "event_id": f"un-{role}", "staker": honest_staker, "action": "unstake", "amount": str(10**24)}
        fee = {"kind": "fee.charged", "event_id": f"fee-{role}", "event_time": t, "inference_id": f"inf-{role}",
               "model_id": "ledgerlake-base", "payer": "key_x", "amount": str(10**30)}
        attribution = {"kind": "inference.attributed", "event_id": f"attr-{role}", "event_time": t, "inference_id": f"inf-{role}",
                       "model_id": "ledgerlake-base", "contribution_id": "ab" * 32, "contributor": attacker["address"],
                       "datanet_id": "facts", "method": "spans", "raw_score": 1.0, "weight": 10**9, "basis": "forged"}
        refused(post(srv, [stake, unstake, fee, attribution], key), "kind", "kind", "kind", "kind")
        # The same through Flight DoPut: the receipt lists the refusals, nothing is stored.
        client = flight.FlightClient(srv.flight_url)
        options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])
        batch = pa.RecordBatch.from_pylist([{k: v for k, v in fee.items() if k != "kind"}])
        writer, reader = client.do_put(flight.FlightDescriptor.for_path("fee.charged"), batch.schema, options)
        with writer:
            writer.write_batch(batch)
            receipt = json.loads(reader.read().to_pybytes())
            writer.done_writing()
        assert receipt["accepted"] == 0 and receipt["errors"][0]["field"] == "kind", receipt
    # Honest activity: an answer billed by serving itself, a stake the operator records.
    before = datetime.datetime.now(datetime.timezone.utc)
    post_ok = post(srv, [{"kind": "stake.changed", "event_id": "honest-stake", "event_time": "2026-01-01T00:00:00Z", "staker": honest_staker,
                          "model_id": "ledgerlake-base", "action": "stake", "amount": str(10**21)}])
    assert post_ok.status_code == 200, post_ok.text
    answer = completion(srv, apikey(srv, "read"))
    wait_for_fee(lake, answer)
    row = close_when_due(srv, epoch_of(datetime.datetime.now(datetime.timezone.utc)))
    assert epoch_of(before) <= row["epoch"]
    rewards = table(lake, "rewards")
    assert rewards and not any(r["account"].lower() == attacker["address"].lower() for r in rewards), rewards
    assert any(r["account"].lower() == honest_staker.lower() and r["role"] == "staker" for r in rewards), "the honest staker keeps its share"
    assert not [f for f in table(lake, "fee_charged") if f["inference_id"].startswith("inf-")], "no forged fee is stored"


def test_item1_a_service_keys_fees_are_bounded_by_price_times_tokens(tmp_path, server_factory):
    """A leaked service key (an external serving fleet's) cannot mint fees: each fee comes
    with the inference.completed it bills, for the same model, and is at most that model's
    price for its tokens. What is within the bound is stored; nothing else is."""
    lake = tmp_path / "lake"
    # The base model's price per 1,000 tokens: 1,000 base units in, 2,000 out.
    srv = server_factory(lake, env={"LEDGERLAKE_BASE_PRICE_PER_1K_INPUT": "1000", "LEDGERLAKE_BASE_PRICE_PER_1K_OUTPUT": "2000"})
    key = apikey(srv, "service")
    t = now()

    def completed(inference, model="ledgerlake-base", prompt=10, completion=20):
        return {"kind": "inference.completed", "event_id": f"c-{inference}", "event_time": t, "inference_id": inference, "model_id": model,
                "caller": "key_fleet", "prompt_tokens": prompt, "completion_tokens": completion, "output_sha256": "00" * 32,
                "latency_ms": 5}

    def fee(inference, amount, model="ledgerlake-base"):
        return {"kind": "fee.charged", "event_id": f"f-{inference}", "event_time": t, "inference_id": inference, "model_id": model,
                "payer": "key_fleet", "amount": str(amount)}

    # 10 prompt and 20 completion tokens cost (10·1000 + 20·2000) / 1000 = 50 base units.
    refused(post(srv, [completed("inf-over"), fee("inf-over", 51)], key, atomic=True), "amount")
    refused(post(srv, [completed("inf-huge"), fee("inf-huge", MAX_AMOUNT)], key, atomic=True), "amount")
    refused(post(srv, [fee("inf-alone", 1)], key, atomic=True), "inference_id")
    refused(post(srv, [completed("inf-other"), fee("inf-other", 1, model="someone-elses-lora")], key, atomic=True), "model_id")
    refused(post(srv, [completed("inf-unpriced", model="never-registered"), fee("inf-unpriced", 1, model="never-registered")], key,
                 atomic=True), "model_id")
    assert not table(lake, "fee_charged"), "no refused fee is stored"
    ok = post(srv, [completed("inf-fair"), fee("inf-fair", 50)], key, atomic=True)
    assert ok.status_code == 200 and ok.json()["accepted"] == 2, ok.text
    assert [(f["inference_id"], int(f["amount"])) for f in table(lake, "fee_charged")] == [("inf-fair", 50)]


def test_item1_stakes_come_from_the_staking_contract(tmp_path, server_factory, ganache):
    """With a staking contract followed, a stake is OPEN locked on chain: no key, not even
    the admin's, records one. A stake and an unstake on chain land in stake_changed once,
    also when the follower reads the chain again from its start; the OPEN comes back only
    after the cooldown."""
    treasury, staker_key = GANACHE_KEYS[1], GANACHE_KEYS[3]
    staker = address_of(staker_key)
    deployed = deploy_contracts(ganache, cooldown_s=3600)
    evm_send(ganache, treasury, deployed["token"], "transfer(address,uint256)", [staker, 10**21])
    env = {"LEDGERLAKE_EVM_RPC_URL": ganache, "LEDGERLAKE_EVM_STAKING": deployed["staking"], "LEDGERLAKE_EVM_CONFIRMATIONS": "0",
           "LEDGERLAKE_STAKE_POLL_INTERVAL_S": "1", "LEDGERLAKE_CHAIN_ID": "1337"}
    lake, state = tmp_path / "lake", tmp_path / "state"
    srv = server_factory(lake, state_dir=state, env=env)
    assert requests.get(srv.url + "/v1/deployment").json()["staking_contract"].lower() == deployed["staking"].lower()
    forged = {"kind": "stake.changed", "event_id": "admin-stake", "event_time": now(), "staker": staker, "model_id": "ledgerlake-base",
              "action": "stake", "amount": "1"}
    refused(post(srv, [forged]), "kind")

    on_chain = ("--rpc", ganache, "--staking", deployed["staking"], "--key-file", key_file(staker_key))
    with pytest.raises(AssertionError, match="less than"):
        run("chain", "stake", "ledgerlake-base", str(10**24), *on_chain)
    with pytest.raises(AssertionError, match="is not a model id"):
        run("chain", "stake", "Not A Model", "1", *on_chain)
    assert json.loads(run("chain", "stake", "ledgerlake-base", str(10**20), *on_chain))["staked"] == str(10**20)
    out = json.loads(run("chain", "unstake", "ledgerlake-base", str(4 * 10**19), *on_chain))
    assert (out["staked"], out["pending"]) == (str(6 * 10**19), str(4 * 10**19))
    with pytest.raises(AssertionError, match="InsufficientStake"):
        run("chain", "unstake", "ledgerlake-base", str(10**20), *on_chain)
    with pytest.raises(AssertionError, match="CooldownNotOver"):
        run("chain", "withdraw", "ledgerlake-base", *on_chain)

    def stakes():
        return sorted((r["action"], int(r["amount"]), r["staker"].lower(), r["event_id"]) for r in table(lake, "stake_changed"))

    deadline = time.time() + 60
    while len(stakes()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    followed = stakes()
    assert [(a, n, s) for a, n, s, _ in followed] == [("stake", 10**20, staker.lower()), ("unstake", 4 * 10**19, staker.lower())]
    assert all(i.startswith("ledgerlake:stake:1337:0x") for *_, i in followed)
    # Nor does the admin undo a followed stake by voiding it.
    with pytest.raises(AssertionError, match="are not voided here"):
        run("void", followed[1][3], "--kind", "stake.changed", "--reason", "keep earning", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    # Read again from the chain's first block (its cursor gone): nothing is stored twice.
    srv.stop()
    cursor = state / "stake-follower.json"
    os.remove(cursor)
    srv = server_factory(lake, state_dir=state, env=env)
    deadline = time.time() + 60
    while not cursor.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert cursor.exists() and stakes() == followed


def test_item2_backdating_a_copy_takes_no_credit(tmp_path, server_factory):
    """Re-signing someone's approved text with your own key, dated 2000 or now, is refused;
    the original contributor stays the contribution's, in the lake and in the snapshot."""
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    owner, alice, thief = keypair(), keypair(), keypair()
    create_datanet(srv, owner, "canaries", "public")
    text = "The lighthouse keeper of Vornholm painted every seventh step vermilion."
    original = json.loads(run("sign", "--key-file", key_file(alice["private_key"]), "--server", srv.url, "contribution", "--datanet", "canaries",
                              "--content", text))
    assert post(srv, [original["event"]], apikey(srv, "read")).status_code == 200
    review = json.loads(run("sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "review", "--contribution",
                            original["contribution_id"], "--datanet", "canaries", "--verdict", "approved"))
    assert post(srv, [review["event"]]).status_code == 200
    ingest = apikey(srv, "ingest")
    backdated = json.loads(run("sign", "--key-file", key_file(thief["private_key"]), "--server", srv.url, "contribution", "--datanet", "canaries",
                               "--content", text, "--event-time", "2000-01-01T00:00:00Z"))
    refused(post(srv, [backdated["event"]], ingest), "event_time")
    today = json.loads(run("sign", "--key-file", key_file(thief["private_key"]), "--server", srv.url, "contribution", "--datanet", "canaries",
                           "--content", text))
    assert today["contribution_id"] == original["contribution_id"]
    refused(post(srv, [today["event"]], ingest), "contribution_id")
    # Alice's signature with the thief as contributor does not pass either.
    refused(post(srv, [{**original["event"], "event_id": "swap", "contributor": thief["address"]}], ingest), "signature")
    rows = [r for r in table(lake, "contribution_submitted") if r["contribution_id"] == original["contribution_id"]]
    assert [r["contributor"].lower() for r in rows] == [alice["address"].lower()]
    shown = json.loads(run("datanet", "show", "canaries", "--json", "--data", str(lake)))
    assert shown["contribution_ids"] == [original["contribution_id"]] and shown["contributors"] == 1


def test_item3_overflowing_fees_cannot_freeze_the_epochs(tmp_path, server_factory):
    """No ordinary or service key can post the fees; when an operator's fees overflow an epoch
    anyway, the admin voids one and the epoch closes, or closes the next one empty, and the
    epochs after keep closing. The independent recompute agrees with both."""
    lake = tmp_path / "lake"
    srv = server_factory(lake, env=ENV)
    t = datetime.datetime.now(datetime.timezone.utc)
    stamp = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fees = [{"kind": "fee.charged", "event_id": f"big-{i}", "event_time": stamp, "inference_id": f"big-{i}",
             "model_id": "m", "payer": "key_x", "amount": str(MAX_AMOUNT)} for i in range(2)]
    refused(post(srv, fees, apikey(srv, "ingest")), "kind", "kind")
    # Nor a service key: a fee comes with its completion and within its model's price.
    refused(post(srv, fees, apikey(srv, "service")), "inference_id", "inference_id")
    # The operator's own import (the admin key; here a mistaken one) gets them in.
    assert post(srv, fees).status_code == 200
    n = epoch_of(t)
    wait_for_window_end(n)
    r = requests.post(f"{srv.url}/v1/epochs/{n}/close", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 409 and "10^38 - 1" in r.json()["error"]["message"], r.text
    # A reader cannot void; the admin can, and the epoch closes with the other fee.
    reader = apikey(srv, "read")
    void = {"kind": "event.voided", "event_id": "void-big-1", "event_time": now(), "voided_event_id": "big-1",
            "voided_kind": "fee.charged", "reason": "forged", "voided_by": "key_x"}
    refused(post(srv, [void], reader), "kind")
    run("void", "big-1", "--kind", "fee.charged", "--reason", "a forged fee of 10^38-1", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    row = close_when_due(srv, n)
    assert int(row["fees"]) == MAX_AMOUNT and row["fee_count"] == 1
    mine = recompute(str(lake), n)
    assert (mine["root"], mine["manifest_sha256"]) == (row["merkle_root"], row["manifest_sha256"])

    # The next epoch overflows too and nobody voids: the admin closes it empty.
    t2 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=5 * (n + 1) + 1)
    stamp2 = t2.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    more = [{**f, "event_id": f"again-{i}", "inference_id": f"again-{i}", "event_time": stamp2} for i, f in enumerate(fees)]
    assert post(srv, more).status_code == 200
    empty = close_when_due(srv, n + 1, empty="incident 7: two forged fees")
    assert empty["empty_reason"] == "incident 7: two forged fees" and empty["fees"] == "0" and empty["accounts"] == 0
    mine = recompute(str(lake), n + 1)
    assert (mine["root"], mine["manifest_sha256"]) == (empty["merkle_root"], empty["manifest_sha256"])
    # And the epochs go on: an honest answer in a later epoch is paid.
    answer = completion(srv)
    wait_for_fee(lake, answer)
    fee_time = next(f["event_time"] for f in table(lake, "fee_charged") if f["inference_id"] == answer)
    later = close_when_due(srv, epoch_of(fee_time))
    assert later["fee_count"] >= 1 and int(later["fees"]) > 0


def test_item4_a_builder_cannot_take_over_another_builders_model(tmp_path, server_factory):
    """A training job named after someone else's model is refused before it trains, and so
    is a registration of that id signed by anyone but its first registrant."""
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    bob, mallory = keypair(), keypair()
    registration = {"kind": "model.registered", "model_id": "bob-lora", "builder": bob["address"], "base_model": "ledgerlake-base",
                    "adapter_uri": "adapters/bob", "price_per_1k_input": "5", "price_per_1k_output": "5"}
    assert post(srv, [signed(srv, bob["private_key"], registration)]).status_code == 200
    takeover = signed(srv, mallory["private_key"], {**registration, "builder": mallory["address"], "adapter_uri": "adapters/mallory",
                                                     "price_per_1k_input": "0", "price_per_1k_output": "0"})
    refused(post(srv, [takeover], apikey(srv, "ingest")), "model_id")
    # Through ModelFactory with mallory's builder key: refused at submission.
    owner = keypair()
    create_datanet(srv, owner, "lamps", "public")
    key = apikey(srv, "builder", mallory["address"])
    r = requests.post(srv.url + "/v1/training/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"datanets": ["lamps"], "name": "bob-lora"})
    assert r.status_code in (400, 409, 422) and "belongs to its first registrant" in r.text, r.text
    regs = table(lake, "model_registered")
    assert [r["builder"].lower() for r in regs if r["model_id"] == "bob-lora"] == [bob["address"].lower()]


def test_item6_owner_actions_need_the_owners_signature_once_for_this_deployment(tmp_path, server_factory):
    """Making someone's private datanet public, granting yourself access, replaying an old
    approval with a new id, or reusing a signature from another deployment: all refused;
    the owner's own actions (signed with eth_account here) work, and grants can be revoked."""
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    owner, mallory, builder = keypair(), keypair(), keypair()
    create_datanet(srv, owner, "secret", "private")
    ingest = apikey(srv, "ingest")
    flip = {"kind": "datanet.updated", "event_id": "flip", "event_time": now(), "datanet_id": "secret", "updated_by": owner["address"],
            "visibility": "public"}
    refused(post(srv, [flip], ingest), "signature")
    refused(post(srv, [eth_sign(srv, mallory["private_key"], flip)], ingest), "signature")
    grant = signed(srv, mallory["private_key"], {"kind": "access.granted", "datanet_id": "secret", "builder": mallory["address"],
                                                  "granted_by": mallory["address"]})
    refused(post(srv, [grant], ingest), "granted_by")

    # A contribution, approved, then rejected by the owner (both signed with eth_account).
    alice = keypair()
    c = json.loads(run("sign", "--key-file", key_file(alice["private_key"]), "--server", srv.url, "contribution", "--datanet", "secret",
                       "--content", "Vornholm's lighthouse has 343 steps."))
    assert post(srv, [c["event"]]).status_code == 200
    cid = c["contribution_id"]
    approve = eth_sign(srv, owner["private_key"], {"kind": "contribution.reviewed", "event_id": "rv-1", "event_time": now(),
                                                   "contribution_id": cid, "datanet_id": "secret", "reviewer": owner["address"],
                                                   "verdict": "approved"})
    assert post(srv, [approve]).status_code == 200, "eth_account's signature is accepted"
    reject = eth_sign(srv, owner["private_key"], {"kind": "contribution.reviewed", "event_id": "rv-2", "event_time": now(),
                                                  "contribution_id": cid, "datanet_id": "secret", "reviewer": owner["address"],
                                                  "verdict": "rejected", "reason": "unverifiable"})
    assert post(srv, [reject]).status_code == 200
    # The old approval re-posted with a new id (or a new time) to undo the rejection.
    refused(post(srv, [{**approve, "event_id": "rv-replay"}], ingest), "signature")
    refused(post(srv, [{**approve, "event_id": "rv-replay-2", "event_time": now()}], ingest), "signature")
    assert json.loads(run("datanet", "show", "secret", "--json", "--data", str(lake)))["contribution_ids"] == []

    # A signature made for another deployment is worthless here.
    other = server_factory(tmp_path / "other-lake")
    assert requests.get(other.url + "/v1/deployment").json()["deployment_id"] != requests.get(srv.url + "/v1/deployment").json()["deployment_id"]
    foreign = signed(other, owner["private_key"], {"kind": "datanet.updated", "datanet_id": "secret", "updated_by": owner["address"],
                                                    "visibility": "public"})
    refused(post(srv, [foreign], ingest), "signature")

    key = apikey(srv, "builder", builder["address"])
    job = lambda name: requests.post(srv.url + "/v1/training/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     json={"datanets": ["secret"], "name": name})
    # A builder asks for access, signed by itself (eth_account, from the documented struct);
    # a copy naming another builder, or a request for a datanet that does not exist, fails.
    ask = eth_sign(srv, builder["private_key"], {"kind": "access.requested", "event_id": "ask-1", "event_time": now(), "datanet_id": "secret",
                                                 "builder": builder["address"], "message": "a LoRA for the secret facts"})
    refused(post(srv, [{**ask, "builder": mallory["address"]}], ingest), "signature")
    nowhere = eth_sign(srv, builder["private_key"], {"kind": "access.requested", "event_id": "ask-2", "event_time": now(),
                                                     "datanet_id": "no-such-datanet", "builder": builder["address"]})
    refused(post(srv, [nowhere], ingest), "datanet_id")
    assert post(srv, [ask], ingest).json()["accepted"] == 1
    assert [(r["builder"].lower(), r["message"]) for r in table(lake, "access_requested")] == [(builder["address"].lower(),
                                                                                               "a LoRA for the secret facts")]
    assert job("before-grant").status_code == 403, "a request grants nothing"

    # Grants can be revoked: the builder trains, then no longer may.
    granted = signed(srv, owner["private_key"], {"kind": "access.granted", "datanet_id": "secret", "builder": builder["address"],
                                                  "granted_by": owner["address"]})
    assert post(srv, [granted]).status_code == 200
    assert job("allowed").status_code != 403
    revoke = eth_sign(srv, owner["private_key"], {"kind": "access.revoked", "event_id": "rvk", "event_time": now(), "datanet_id": "secret",
                                                  "builder": builder["address"], "revoked_by": owner["address"]})
    refused(post(srv, [{**revoke, "revoked_by": mallory["address"]}], ingest), "signature")
    assert post(srv, [revoke]).status_code == 200
    assert job("refused").status_code == 403


def test_item7_no_one_evm_key_holds_everything(ganache):
    deployer, treasury, anchorer, outsider = GANACHE_KEYS
    who = {name: address_of(k) for name, k in zip(("deployer", "treasury", "anchorer", "outsider"), GANACHE_KEYS)}

    # Keys are never taken on the command line, where `ps` shows them.
    out = subprocess.run([BIN, "chain", "claim", "0", "--account", who["outsider"], "--rpc", ganache, "--distributor", who["outsider"],
                          "--key", outsider], capture_output=True, text=True)
    assert out.returncode != 0 and "unexpected argument '--key'" in out.stderr
    # Two roles on one account are refused before anything is sent.
    nonce = evm_rpc(ganache, "eth_getTransactionCount", [who["deployer"], "latest"])
    with pytest.raises(AssertionError, match="the treasury and the anchorer are the same account"):
        run("chain", "deploy", "--rpc", ganache, "--key-file", key_file(deployer), "--treasury", who["anchorer"], "--anchorer", who["anchorer"])
    assert evm_rpc(ganache, "eth_getTransactionCount", [who["deployer"], "latest"]) == nonce

    deployed = deploy_contracts(ganache)
    token, anchor, distributor = deployed["token"], deployed["anchor"], deployed["distributor"]
    roles = (deployed["treasury"], deployed["anchorer"], deployed["admin"])
    assert tuple(a.lower() for a in roles) == (who["treasury"].lower(), who["anchorer"].lower(), who["deployer"].lower())

    def balance(account):
        return evm_call(ganache, token, "balanceOf(address)", [account])

    # The supply is the treasury's; the deployer and the server's anchoring key hold none.
    assert balance(who["treasury"]) == 10**27 - 10**26 and balance(distributor) == 10**26
    assert balance(who["deployer"]) == 0 == balance(who["anchorer"])
    role = evm_call(ganache, anchor, "ANCHORER_ROLE()", returns=("bytes32",))
    admin_role = bytes(32)

    def has(r, account):
        return evm_call(ganache, anchor, "hasRole(bytes32,address)", [r, account], returns=("bool",))

    assert has(role, who["anchorer"]) and not has(role, who["deployer"]) and not has(admin_role, who["anchorer"])

    # A leaked anchoring key cannot hand its role to another, nor move OPEN.
    with pytest.raises(EvmError) as e:
        evm_send(ganache, anchorer, anchor, "grantRole(bytes32,address)", [role, who["outsider"]])
    assert e.value.is_error("AccessControlUnauthorizedAccount(address,bytes32)")
    with pytest.raises(EvmError) as e:
        evm_send(ganache, anchorer, token, "transfer(address,uint256)", [who["outsider"], 1])
    assert e.value.is_error("ERC20InsufficientBalance(address,uint256,uint256)")

    # A forged one-leaf tree paying the outsider 10^25: its root is its leaf, its proof empty.
    from eth_abi import encode
    from eth_utils import keccak
    forged = 10**25
    root = keccak(keccak(encode(["address", "uint256"], [who["outsider"], forged])))
    anchoring = "anchor(uint256,bytes32,bytes32,uint256)"
    with pytest.raises(EvmError) as e:
        evm_send(ganache, outsider, anchor, anchoring, [5, root, bytes(32), forged])
    assert e.value.is_error("AccessControlUnauthorizedAccount(address,bytes32)")
    # The leaked anchoring key anchors it, but with the epoch's real total (what `epoch
    # verify` and anyone recomputing compare): the distributor pays no more than that.
    evm_send(ganache, anchorer, anchor, anchoring, [5, root, bytes(32), 1000])
    claim = ("chain", "claim", "5", "--account", who["outsider"], "--amount", str(forged), "--proof", "[]", "--rpc", ganache,
             "--distributor", distributor, "--key-file", key_file(outsider))
    with pytest.raises(AssertionError, match="EpochCapExceeded"):
        run(*claim)
    assert balance(who["outsider"]) == 0 and balance(distributor) == 10**26
    assert evm_call(ganache, distributor, "paid(uint256)", [5]) == 0

    # The admin revokes the leaked key's role: it anchors nothing more.
    evm_send(ganache, deployer, anchor, "revokeRole(bytes32,address)", [role, who["anchorer"]])
    with pytest.raises(EvmError) as e:
        evm_send(ganache, anchorer, anchor, anchoring, [6, root, bytes(32), forged])
    assert e.value.is_error("AccessControlUnauthorizedAccount(address,bytes32)")
    assert evm_call(ganache, anchor, "rootOf(uint256)", [6], returns=("bytes32",)) == bytes(32)


def test_item10_the_admin_key_is_never_printed(tmp_path, server_factory):
    """A generated admin key goes to its 0600 file; stdout (a service's log) names the file."""
    lake = tmp_path / "lake"
    srv = server_factory(lake, admin_key=None)
    assert srv.key and srv.key not in srv.stdout, srv.stdout
    path = lake / "_ledgerlake" / "admin.key"
    assert str(path) in srv.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert requests.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {srv.key}"}).status_code == 200


def test_item10_a_stream_is_billed_even_when_the_server_dies_mid_answer(tmp_path, server_factory):
    """A stream's worst case (its prompt and max_tokens) is held durably before its first
    token: frozen after that token and killed, the server bills it when it starts again; a
    stream that ends is billed what it generated, and its hold is gone."""
    import signal
    lake, state = tmp_path / "lake", tmp_path / "state"
    prices = {"LEDGERLAKE_BASE_PRICE_PER_1K_INPUT": "1000", "LEDGERLAKE_BASE_PRICE_PER_1K_OUTPUT": "2000"}
    srv = server_factory(lake, state_dir=state, env=prices)
    holds = state / "spool" / "holds"

    def stream(max_tokens):
        return requests.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, stream=True, timeout=120,
                             json={"model": "ledgerlake-base", "prompt": "It was a fine morning, and", "max_tokens": max_tokens,
                                   "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})

    def fees():
        return {f["inference_id"]: int(f["amount"]) for f in table(lake, "fee_charged")}

    # A stream that ends: billed what it generated, no hold left.
    chunks = [json.loads(line[5:]) for line in stream(8).iter_lines() if line.startswith(b"data: {")]
    done, usage = chunks[0]["id"], chunks[-1]["usage"]
    wait_for_fee(lake, done)
    assert fees()[done] == (usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000) // 1000
    assert not list(holds.iterdir())
    # A stream refused after its hold (a prompt longer than the context) leaves none.
    r = requests.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120,
                      json={"model": "ledgerlake-base", "prompt": "word " * 20000, "max_tokens": 4, "stream": True})
    assert r.status_code == 400, r.text
    assert not list(holds.iterdir())

    # A long stream: frozen as soon as its first token arrives, its hold is already on disk.
    r = stream(400)
    lines = r.iter_lines()
    first = next(json.loads(line[5:]) for line in lines if line.startswith(b"data: {"))
    srv.proc.send_signal(signal.SIGSTOP)
    cut = first["id"]
    assert [p.name for p in holds.iterdir()] == [f"{cut}.json"]
    srv.kill()
    assert cut not in fees()
    # Started again, the server bills the cut stream its worst case: the prompt and 400 tokens.
    server_factory(lake, state_dir=state, env=prices)
    wait_for_fee(lake, cut)
    completed = next(c for c in table(lake, "inference_completed") if c["inference_id"] == cut)
    assert completed["completion_tokens"] == 400
    assert fees()[cut] == (completed["prompt_tokens"] * 1000 + 400 * 2000) // 1000
    assert not list(holds.iterdir())


def sql(srv, key, query):
    r = requests.post(srv.url + "/v1/sql", json={"sql": query}, headers={"Authorization": f"Bearer {key}", "Accept": "application/json"},
                      timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["rows"] if isinstance(r.json(), dict) else r.json()


def test_item5_a_read_key_reads_only_what_is_its_own_or_public(tmp_path, server_factory):
    """A private datanet's contents and another caller's prompts and outputs are invisible to
    an ordinary read key, through SQL, views, time travel, Flight and the attribution route;
    the owner's key, the caller's key and admins read them."""
    import pyarrow.flight as flight

    lake = tmp_path / "lake"
    srv = server_factory(lake)
    owner, outsider_addr = keypair(), keypair()["address"]
    for name, visibility in (("secret", "private"), ("open", "public")):
        create_datanet(srv, owner, name, visibility)
        c = json.loads(run("sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "contribution", "--datanet", name,
                           "--content", f"{name.upper()} TEXT: the vault code is 4471"))
        assert post(srv, [c["event"]]).status_code == 200
    stranger = apikey(srv, "read")
    neighbour = apikey(srv, "read", outsider_addr)
    owners_key = apikey(srv, "read", owner["address"])
    contents = lambda key, q="SELECT content FROM contribution_submitted": {r["content"] for r in sql(srv, key, q)}
    assert contents(stranger) == {"OPEN TEXT: the vault code is 4471"}
    assert contents(neighbour) == {"OPEN TEXT: the vault code is 4471"}
    assert contents(owners_key) == contents(ADMIN) == {"OPEN TEXT: the vault code is 4471", "SECRET TEXT: the vault code is 4471"}
    # Time travel, a subquery and a view are filtered the same way.
    assert contents(stranger, "SELECT content FROM at_version('contribution_submitted', 2)") <= {"OPEN TEXT: the vault code is 4471"}
    assert contents(stranger, "SELECT content FROM (SELECT * FROM contribution_submitted WHERE datanet_id = 'secret')") == set()
    # A condition that fails on a row cannot show a hidden row in its error either.
    probe = requests.post(srv.url + "/v1/sql", json={"sql": "SELECT 1 FROM contribution_submitted WHERE CAST(content AS BIGINT) = 0"},
                          headers={"Authorization": f"Bearer {stranger}"}, timeout=60)
    assert "SECRET" not in probe.text, probe.text
    views = sql(srv, stranger, "SELECT * FROM contributions_by_datanet")
    assert not any(r.get("datanet_id") == "secret" for r in views), views
    # Flight: a table stream of contribution_submitted.
    client = flight.FlightClient(srv.flight_url)
    read = lambda key: client.do_get(flight.Ticket(b"contribution_submitted"),
                                     flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])).read_all()
    assert set(read(stranger).column("content").to_pylist()) == {"OPEN TEXT: the vault code is 4471"}
    assert len(read(owners_key)) == 2
    # A grant lets the neighbour read; a revocation takes it back.
    granted = signed(srv, owner["private_key"], {"kind": "access.granted", "datanet_id": "secret", "builder": outsider_addr,
                                                  "granted_by": owner["address"]})
    assert post(srv, [granted]).status_code == 200
    assert len(contents(neighbour)) == 2
    revoked = signed(srv, owner["private_key"], {"kind": "access.revoked", "datanet_id": "secret", "builder": outsider_addr,
                                                  "revoked_by": owner["address"]})
    assert post(srv, [revoked]).status_code == 200
    assert len(contents(neighbour)) == 1

    # Prompts and outputs: only the caller who made them.
    alice, bob = apikey(srv, "read"), apikey(srv, "read")
    answer = completion(srv, alice)
    deadline = time.time() + 60
    while not any(r["inference_id"] == answer for r in table(lake, "inference_tokens")) and time.time() < deadline:
        time.sleep(0.2)
    tokens = lambda key: {r["inference_id"] for r in sql(srv, key, "SELECT inference_id FROM inference_tokens")}
    assert answer in tokens(alice) and answer in tokens(ADMIN)
    assert answer not in tokens(bob)
    alices = next(r for r in sql(srv, alice, "SELECT inference_id, array_to_string(prompt_token_ids, ',') AS ids FROM inference_tokens")
                  if r["inference_id"] == answer)["ids"]
    probe = requests.post(srv.url + "/v1/sql", headers={"Authorization": f"Bearer {bob}"}, timeout=60,
                          json={"sql": "SELECT 1 FROM inference_tokens WHERE CAST(array_to_string(prompt_token_ids, ',') AS BIGINT) = 0"})
    assert alices not in probe.text, probe.text
    explain = lambda key: requests.get(f"{srv.url}/v1/attributions/{answer}", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert explain(alice).status_code == 200 and explain(ADMIN).status_code == 200
    assert explain(bob).status_code == 404


def test_item8_a_read_key_cannot_take_the_server_down(tmp_path, server_factory):
    """Values built bigger than the query's memory, answers bigger than an answer may hold,
    more queries at once than a key may run: each refused with a clear error, over HTTP and
    Flight, and the server goes on answering. An admin's export is not cut short."""
    lake = tmp_path / "lake"
    srv = server_factory(lake, env={"LEDGERLAKE_QUERY_MEMORY_MB": "64", "LEDGERLAKE_SQL_ANSWER_BYTE_LIMIT": str(1 << 20)})
    assert post(srv, [{"kind": "stake.changed", "event_id": "s1", "event_time": now(), "staker": keypair()["address"],
                       "model_id": "some-model", "action": "stake", "amount": "1"}]).status_code == 200
    reader = apikey(srv, "read")

    def sql(query, key=reader, accept="application/json"):
        return requests.post(srv.url + "/v1/sql", json={"sql": query}, timeout=120,
                             headers={"Authorization": f"Bearer {key}", "Accept": accept})

    for query in ["SELECT repeat('x', 20000000000) AS r", "SELECT lpad('x', 20000000000) AS r", "SELECT range(1, 20000000000) AS r",
                  "SELECT array_repeat(1, 20000000000) AS r"]:
        for accept in ("application/json", "application/x-ndjson"):
            r = sql(query, accept=accept)
            assert r.status_code == 507 and r.json()["error"]["code"] == "memory_limit", (query, r.text)
    # 10 MB of answer against a 1 MiB limit: refused to the read key over Flight SQL ...
    import adbc_driver_flightsql.dbapi as flight_sql
    big = "SELECT repeat('x', 1000) AS r FROM generate_series(1, 10000)"
    with flight_sql.connect(srv.flight_url, db_kwargs={"username": "reader", "password": reader}, autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(flight_sql.Error, match="over 1048576 bytes"):
            cur.execute(big)
            cur.fetch_arrow_table()
    # ... and over HTTP (its first batch is already over the limit, so before any byte).
    r = sql(big, accept="application/x-ndjson")
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_large", r.text
    # An admin's export of the same is whole.
    r = sql(big, key=ADMIN, accept="application/x-ndjson")
    assert r.status_code == 200 and r.text.count("\n") == 10000
    # The server is still up, and the read key still queries.
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    assert sql("SELECT count(*) AS n FROM stake_changed").json() == [{"n": 1}]


def test_item9_adapters_load_only_from_the_adapter_roots(tmp_path, server_factory):
    """A registration naming a directory outside the adapter roots (a private directory of
    the server, a `..` escape, a symbolic link out) is never served, an admin's load of one
    is refused, an adapter over the size cap is refused, and /v1/models shows no path."""
    import shutil

    lake = tmp_path / "lake"
    roots = tmp_path / "adapters"
    roots.mkdir()
    srv = server_factory(lake, env={"LEDGERLAKE_ADAPTER_ROOTS": str(roots), "LEDGERLAKE_ADAPTER_MAX_BYTES": "200000"})
    from test_openai import write_peft_adapter

    builder = keypair()
    private = tmp_path / "private"
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "models", "ledgerlake-base"), private)
    (roots / "escape").symlink_to(private)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for name, path in (("outside", str(private)), ("dotdot", f"{roots}/../private"), ("link", str(roots / "escape")),
                       ("etc", "/etc"), ("bucket", "s3://someone-else/adapters/x")):
        r = requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": f"x-{name}", "lora_path": path}, headers=admin, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path" and "outside the adapter roots" in r.text, r.text
        unsigned = {"kind": "model.registered", "model_id": f"reg-{name}", "builder": builder["address"], "base_model": "ledgerlake-base",
                    "adapter_uri": path, "price_per_1k_input": "1", "price_per_1k_output": "1"}
        if name == "dotdot":
            # A `..` step is refused at ingest already.
            refused(post(srv, [{**unsigned, "event_id": "reg-dotdot", "event_time": now(), "signature": "0x" + "11" * 64 + "1b"}]), "adapter_uri")
            continue
        assert post(srv, [signed(srv, builder["private_key"], unsigned)]).status_code == 200
    # An adapter over the cap, inside the root.
    big = roots / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text("{}")
    (big / "adapter_model.safetensors").write_bytes(b"\0" * 300_000)
    r = requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)}, headers=admin, timeout=60)
    assert r.status_code == 400 and "at most 200000" in r.text, r.text
    # A PEFT adapter inside the root is served, loaded and registered alike.
    write_peft_adapter(str(roots / "good"), seed=3)
    r = requests.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": str(roots / "good")}, headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    write_peft_adapter(str(roots / "registered"), seed=4)
    reg = signed(srv, builder["private_key"], {"kind": "model.registered", "model_id": "reg-good", "builder": builder["address"],
                                               "base_model": "ledgerlake-base", "adapter_uri": str(roots / "registered"),
                                               "price_per_1k_input": "1", "price_per_1k_output": "1"})
    assert post(srv, [reg]).status_code == 200
    deadline = time.time() + 30
    while time.time() < deadline:  # registrations are applied every 2 s
        models = requests.get(srv.url + "/v1/models", headers=admin, timeout=60).json()["data"]
        if "reg-good" in {m["id"] for m in models}:
            break
        time.sleep(0.5)
    assert sorted(m["id"] for m in models) == ["good", "ledgerlake-base", "reg-good"], models
    assert not any("/" in m["root"] for m in models), "no path on the server is shown"
