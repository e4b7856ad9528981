"""End-to-end: reward epochs through the real binary. Fees, attributions, stakes and a
registration go in over HTTP (the registration signed by its builder, the rest with the
admin key); `ledgerlake epoch close` closes an epoch; an independent
re-implementation (recompute_epoch.py, from docs/epochs.md alone, with
@openzeppelin/merkle-tree) reproduces its root and manifest; the server's tree loads in
OpenZeppelin's library and its proofs verify; late fees go to the next epoch; and a
recomputation after more events is byte-identical."""
import json
import os
import random
import subprocess

import pytest
import requests
from deltalake import DeltaTable

from conftest import ADMIN, BIN, key_file, keypair, run, signed
from recompute_epoch import CHAIN, recompute

ENV = {"LEDGERLAKE_EPOCH_GENESIS": "2026-11-01T00:00:00Z", "LEDGERLAKE_EPOCH_LENGTH_S": "86400", "LEDGERLAKE_EPOCH_GRACE_S": "0"}
STAKERS = ["0x" + "5a" * 20, "0x" + "5b" * 20]


def contributor(i):
    return "0x" + f"{i + 1:02x}" * 20


def fee(i, when, amount, model="m-1"):
    return {"kind": "fee.charged", "event_id": f"fee-{i}", "event_time": when, "inference_id": f"inf-{i}",
            "model_id": model, "payer": "key_x", "amount": str(amount)}


def attributions(i, rng):
    """Random weights summing to exactly 10^9 over up to 4 of 6 contributors, or one row of none."""
    if i % 7 == 3:
        return [{"kind": "inference.attributed", "event_id": f"attr-{i}-none", "event_time": "2026-11-12T00:00:00Z",
                 "inference_id": f"inf-{i}", "model_id": "m-1", "method": "spans", "raw_score": 0.0, "weight": 0, "basis": "t"}]
    who = rng.sample(range(6), rng.randint(1, 4))
    cuts = sorted(rng.randint(0, 10**9) for _ in who[1:])
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 10**9])]
    return [{"kind": "inference.attributed", "event_id": f"attr-{i}-{w}", "event_time": "2026-11-12T00:00:00Z",
             "inference_id": f"inf-{i}", "model_id": "m-1", "contribution_id": f"{w + 1:064x}", "contributor": contributor(w),
             "datanet_id": "facts" if w % 2 else "news", "method": "spans", "raw_score": 1.0, "weight": weight, "basis": "t"}
            for w, weight in zip(who, weights)]


def post(srv, events):
    r = srv.post("\n".join(json.dumps(e) for e in events))
    assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text
    return r


def node(mode, payload):
    out = subprocess.run(["node", os.path.join(CHAIN, "merkle.js"), mode], input=json.dumps(payload), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_epochs_close_recompute_independently_and_prove(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake, env=ENV)
    get = lambda path, key=ADMIN: requests.get(srv.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    rng = random.Random(7)

    # The builder signs its registration, timed now: when it was registered does not matter
    # to an epoch (the owner's latest registration in ingest order counts).
    builder = keypair()
    registration = {"kind": "model.registered", "event_id": "reg-1", "model_id": "m-1", "builder": builder["address"],
                    "base_model": "ledgerlake-base", "adapter_uri": "a/m-1", "datanets": [],
                    "price_per_1k_input": "1", "price_per_1k_output": "1"}
    post(srv, [signed(srv, builder["private_key"], registration)])
    # m-1 is its first registrant's: another builder's registration of it is refused.
    intruder = keypair()
    taken = signed(srv, intruder["private_key"], {**registration, "event_id": "reg-1-intruder", "builder": intruder["address"]})
    r = srv.post(json.dumps(taken), content_type="application/json")
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["model_id"], r.text
    # Stakes (an operator's record, admin key) keep their times in the epochs' windows.
    post(srv, [{"kind": "stake.changed", "event_id": "st-1", "event_time": "2026-11-05T00:00:00Z", "staker": STAKERS[0],
                "model_id": "m-1", "action": "stake", "amount": "3000000000000000000000"},
               {"kind": "stake.changed", "event_id": "st-2", "event_time": "2026-11-10T06:00:00Z", "staker": STAKERS[1],
                "model_id": "m-1", "action": "stake", "amount": "1000000000000000000000"},
               {"kind": "stake.changed", "event_id": "st-3", "event_time": "2026-11-10T18:00:00Z", "staker": STAKERS[1],
                "model_id": "m-1", "action": "unstake", "amount": "5000000000000000000000"}])
    # 40 fees on 10 November (epoch 9), one earlier (the first closed epoch takes it), one of
    # model m-2 (never registered: its builder share goes to the treasury), amounts up to 10^20.
    fees = [fee(i, f"2026-11-10T{i % 24:02d}:{i:02d}:00Z", rng.choice([rng.randint(1, 10**20), rng.randint(1, 999)])) for i in range(40)]
    fees += [fee(40, "2026-11-03T00:00:00Z", 12345), fee(41, "2026-11-10T23:59:59Z", 10**18, model="m-2")]
    post(srv, fees)
    post(srv, [a for i in range(42) if i % 9 != 5 for a in attributions(i, rng)])  # some fees have no rows yet

    # The kinds only the epoch job writes are refused from outside, naming the kind.
    forged = {"kind": "reward.earned", "event_id": "forged", "event_time": "2026-11-10T00:00:00Z", "epoch": 9,
              "account": contributor(0), "role": "contributor", "amount": "5", "breakdown": [{"model_id": "m-1", "amount": "5"}]}
    r = srv.post(json.dumps(forged), content_type="application/json")
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "kind", r.text

    # Closing: only an admin, only in order, only once the window has ended.
    reader = json.loads(run("apikey", "--role", "read", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["key"]
    assert requests.post(srv.url + "/v1/epochs/9/close", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
    late = requests.post(srv.url + "/v1/epochs/99999/close", headers={"Authorization": f"Bearer {ADMIN}"})
    assert late.status_code == 409 and "may close from" in late.json()["error"]["message"], late.text
    closed = json.loads(run("epoch", "close", "9", "--server", srv.url, "--api-key-file", key_file(ADMIN)))
    assert closed["already_closed"] is False
    row = closed["epoch"]
    total = sum(int(f["amount"]) for f in fees)
    assert int(row["fees"]) == total and row["fee_count"] == 42 and row["anchor"].startswith("log:")
    skip = requests.post(srv.url + "/v1/epochs/11/close", headers={"Authorization": f"Bearer {ADMIN}"})
    assert skip.status_code == 409 and "next to close is 10" in skip.json()["error"]["message"]

    # The rewards table sums to the fees exactly, with no negative amount.
    rewards = DeltaTable(str(lake / "rewards")).to_pyarrow_table().to_pylist()
    assert sum(int(r["amount"]) for r in rewards) == total and all(int(r["amount"]) > 0 for r in rewards)
    assert {r["role"] for r in rewards} == {"builder", "contributor", "staker", "treasury"}

    # The independent re-implementation reproduces the root, the manifest and every reward.
    mine = recompute(str(lake), 9)
    assert mine["root"] == row["merkle_root"]
    assert mine["manifest_sha256"] == row["manifest_sha256"]
    assert sorted(mine["rewards"]) == sorted((r["account"].lower(), r["role"], int(r["amount"])) for r in rewards)
    computed = json.loads(run("epoch", "compute", "9", "--data", str(lake), env=ENV))
    assert json.dumps(computed["manifest"], sort_keys=True, separators=(",", ":")).encode() == mine["manifest"]

    # The server's tree is OpenZeppelin's: it loads, its root is the epoch's, every proof
    # verifies, and the proof endpoint gives the library's proof.
    dump = get("/v1/epochs/9/tree").json()
    assert dump["tree"] == mine["tree"]["dump"]["tree"]
    loaded = node("load", {"dump": dump})
    assert loaded["root"] == row["merkle_root"] and all(p["verified"] for p in loaded["proofs"])
    account, amount = dump["values"][0]["value"]
    proof = get(f"/v1/epochs/9/proofs/{account}").json()
    assert proof["amount"] == amount and proof["merkle_root"] == row["merkle_root"]
    assert proof["proof"] == loaded["proofs"][0]["proof"]
    cli = json.loads(run("epoch", "proof", "9", "--account", account, "--data", str(lake)))
    assert cli["proof"] == proof["proof"]
    assert get(f"/v1/epochs/9/proofs/0x{'99' * 20}").status_code == 404
    assert get("/v1/epochs/9/proofs/0x12").status_code == 400
    assert get("/v1/epochs/10/proofs/" + account).status_code == 409

    # More events: a late fee of epoch 9 and one of epoch 10. Epoch 9 recomputes to the same
    # bytes and verifies; closing it again writes nothing; the late fee is epoch 10's.
    post(srv, [fee(50, "2026-11-10T12:00:00Z", 777), fee(51, "2026-11-11T01:00:00Z", 1000)])
    post(srv, attributions(50, rng))
    again = json.loads(run("epoch", "compute", "9", "--data", str(lake), env=ENV))
    assert again["manifest"] == computed["manifest"] and again["merkle_root"] == row["merkle_root"]
    verified = json.loads(run("epoch", "verify", "9", "--data", str(lake)))
    assert verified["verified"] is True, verified
    assert json.loads(run("epoch", "close", "9", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["already_closed"] is True
    ten = json.loads(run("epoch", "close", "10", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["epoch"]
    assert (ten["fee_count"], int(ten["fees"])) == (2, 1777)
    assert ten["previous_fee_version"] == row["fee_version"]
    mine = recompute(str(lake), 10)
    assert (mine["root"], mine["manifest_sha256"]) == (ten["merkle_root"], ten["manifest_sha256"])

    # The anchor log chains both epochs and verifies; so does the HTTP route.
    report = json.loads(run("anchor", "verify", "--data", str(lake)))
    assert report["entries"] == 2 and report["problems"] == [], report
    assert get("/v1/anchors/verify").json()["problems"] == []
    listed = get("/v1/epochs").json()["epochs"]
    assert [(e["epoch"], e["stage"]) for e in listed] == [(9, "closed"), (10, "closed")]
    shown = json.loads(run("epoch", "show", "11", "--data", str(lake), env=ENV))
    assert shown["status"] == "open" and shown["window_start"].startswith("2026-11-12T00:00:00")


def test_voided_events_and_an_empty_epoch_recompute_independently(tmp_path, server_factory):
    """Incident response: an admin voids a fee and a stake before an epoch closes; the epoch
    does not count them, the independent re-implementation agrees, and voiding more later
    does not change a closed epoch. An epoch closed empty (with a reason) pays no one, says
    why in its manifest, and the next epoch does not take its fees."""
    lake = tmp_path / "lake"
    srv = server_factory(lake, env=ENV)
    rng = random.Random(11)
    builder = keypair()
    post(srv, [signed(srv, builder["private_key"], {"kind": "model.registered", "event_id": "reg-1", "model_id": "m-1",
                                                    "builder": builder["address"], "base_model": "ledgerlake-base",
                                                    "adapter_uri": "a/m-1", "datanets": [], "price_per_1k_input": "1",
                                                    "price_per_1k_output": "1"})])
    post(srv, [{"kind": "stake.changed", "event_id": "st-1", "event_time": "2026-11-05T00:00:00Z", "staker": STAKERS[0],
                "model_id": "m-1", "action": "stake", "amount": "1000000000000000000000"},
               {"kind": "stake.changed", "event_id": "st-2", "event_time": "2026-11-09T00:00:00Z", "staker": STAKERS[1],
                "model_id": "m-1", "action": "stake", "amount": "1000000000000000000000"}])
    # Ten fees in epoch 9 (10 November), one in epoch 10, one in epoch 11.
    fees = [fee(i, f"2026-11-10T{i:02d}:00:00Z", 1000 + i) for i in range(10)]
    fees += [fee(10, "2026-11-11T01:00:00Z", 5000), fee(11, "2026-11-12T01:00:00Z", 7000)]
    post(srv, fees)
    post(srv, [a for i in range(10) for a in attributions(i, rng)])

    # Only an admin key voids, and only a stored event.
    service = json.loads(run("apikey", "--role", "service", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["key"]
    by_service = {"kind": "event.voided", "event_id": "void-by-service", "event_time": "2026-11-10T12:00:00Z",
                  "voided_event_id": "fee-4", "voided_kind": "fee.charged", "reason": "no", "voided_by": "key_x"}
    r = srv.post(json.dumps(by_service), content_type="application/json", key=service)
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["kind"], r.text
    with pytest.raises(AssertionError, match="voided_event_id"):
        run("void", "fee-404", "--kind", "fee.charged", "--reason", "never stored", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    out = run("void", "fee-3", "--kind", "fee.charged", "--reason", "refunded to the payer", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    assert "voided fee-3" in out, out
    run("void", "st-2", "--kind", "stake.changed", "--reason", "the stake never arrived", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    voids = DeltaTable(str(lake / "voided_events")).to_pyarrow_table().to_pylist()
    assert sorted((v["voided_event_id"], v["voided_kind"]) for v in voids) == [("fee-3", "fee.charged"), ("st-2", "stake.changed")]

    row = json.loads(run("epoch", "close", "9", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["epoch"]
    counted = [f for f in fees[:10] if f["event_id"] != "fee-3"]
    total = sum(int(f["amount"]) for f in counted)
    assert (row["fee_count"], int(row["fees"])) == (len(counted), total), row
    rewards = [r for r in DeltaTable(str(lake / "rewards")).to_pyarrow_table().to_pylist() if r["epoch"] == 9]
    assert sum(int(r["amount"]) for r in rewards) == total
    assert {r["account"].lower() for r in rewards if r["role"] == "staker"} == {STAKERS[0]}, "the voided stake earns nothing"
    assert {r["account"].lower() for r in rewards if r["role"] == "builder"} == {builder["address"].lower()}
    mine = recompute(str(lake), 9)
    assert (mine["root"], mine["manifest_sha256"]) == (row["merkle_root"], row["manifest_sha256"])
    assert sorted(mine["rewards"]) == sorted((r["account"].lower(), r["role"], int(r["amount"])) for r in rewards)
    assert mine["recorded"]["void_version"] is not None and "voided_events" in json.loads(mine["manifest"])["inputs"]
    computed = json.loads(run("epoch", "compute", "9", "--data", str(lake), env=ENV))
    assert json.dumps(computed["manifest"], sort_keys=True, separators=(",", ":")).encode() == mine["manifest"]

    # A void after the close does not change the closed epoch: it read voids at its pin.
    run("void", "fee-5", "--kind", "fee.charged", "--reason", "late refund", "--server", srv.url, "--api-key-file", key_file(ADMIN))
    again = json.loads(run("epoch", "compute", "9", "--data", str(lake), env=ENV))
    assert again["manifest"] == computed["manifest"] and again["merkle_root"] == row["merkle_root"]
    assert json.loads(run("epoch", "verify", "9", "--data", str(lake)))["verified"] is True

    # Epoch 10 closed empty: no fee counted, no reward, the reason in its manifest.
    empty = json.loads(run("epoch", "close", "10", "--empty", "fees cannot be split", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["epoch"]
    assert (empty["fee_count"], int(empty["fees"])) == (0, 0), empty
    assert not [r for r in DeltaTable(str(lake / "rewards")).to_pyarrow_table().to_pylist() if r["epoch"] == 10]
    mine = recompute(str(lake), 10)
    assert (mine["root"], mine["manifest_sha256"]) == (empty["merkle_root"], empty["manifest_sha256"])
    assert json.loads(mine["manifest"])["empty_reason"] == "fees cannot be split" and mine["rewards"] == []
    assert json.loads(run("epoch", "verify", "10", "--data", str(lake)))["verified"] is True
    # Epoch 11 takes its own fee only, not the fees of the epoch closed empty.
    eleven = json.loads(run("epoch", "close", "11", "--server", srv.url, "--api-key-file", key_file(ADMIN)))["epoch"]
    assert (eleven["fee_count"], int(eleven["fees"])) == (1, 7000), eleven
    mine = recompute(str(lake), 11)
    assert (mine["root"], mine["manifest_sha256"]) == (eleven["merkle_root"], eleven["manifest_sha256"])


def test_up_closes_due_epochs_in_order_when_asked(tmp_path, server_factory):
    """With `epoch_auto_close`, `up` closes each epoch once its window has passed, in order,
    anchored in the log; a fee lands in exactly one of them."""
    import time

    lake = tmp_path / "lake"
    env = {"LEDGERLAKE_EPOCH_GENESIS": "2026-01-01T00:00:00Z", "LEDGERLAKE_EPOCH_LENGTH_S": "2", "LEDGERLAKE_EPOCH_GRACE_S": "0",
           "LEDGERLAKE_EPOCH_AUTO_CLOSE": "true"}
    srv = server_factory(lake, env=env)
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + "Z"
    post(srv, [fee(1, stamp, 4321)])
    fee_epoch = (int(now) - 1767225600) // 2
    deadline = time.time() + 90
    closed = []
    while time.time() < deadline:
        rows = DeltaTable(str(lake / "epochs")).to_pyarrow_table().to_pylist() if (lake / "epochs").exists() else []
        closed = sorted((r["epoch"], int(r["fees"]), r["fee_count"]) for r in rows if r["stage"] == "closed")
        if closed and closed[-1][0] > fee_epoch:
            break
        time.sleep(0.5)
    assert closed and closed[-1][0] > fee_epoch, closed
    numbers = [c[0] for c in closed]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "contiguous"
    assert sum(c[2] for c in closed) == 1 and sum(c[1] for c in closed) == 4321, closed
    report = json.loads(run("anchor", "verify", "--data", str(lake)))
    assert report["problems"] == [] and report["entries"] == len(closed)
