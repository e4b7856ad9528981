"""End to end on a local EVM chain (ganache): ingest, serve, attribute, close an epoch whose
root is anchored in ledgerlake's EpochAnchor contract, survive a kill -9 between sending the
anchor transaction and recording it, and claim a contributor's OPEN with its proof from a
separate key; claiming twice, with a wrong amount or with another account's proof fails.
The contracts are the committed build of chain/contracts, which must match a fresh solc-js
compile."""
import json
import os
import subprocess
import time

import pytest
import requests
from deltalake import DeltaTable

from conftest import (ADMIN, BIN, CHAIN_DIR, GANACHE_KEYS, address_of, approved_datanet, deploy_contracts, evm_call, evm_rpc, key_file,
                      keypair, run)
from recompute_epoch import recompute
from test_attribution import PROMPT, answer, table, wait_for

ANCHORED_FOREIGN = "0x8be0079c531659141344cd1fd0a4f28419497f9722a3daafe3b4186f6b6457e0"  # OwnershipTransferred
LENGTH = 5


def test_the_committed_contract_build_matches_the_sources():
    out = subprocess.run(["node", os.path.join(CHAIN_DIR, "build.js"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def anchored_logs(rpc, contract, epoch):
    logs = evm_rpc(rpc, "eth_getLogs", [{"address": contract, "fromBlock": "0x0", "toBlock": "latest"}])
    return [l for l in logs if l["topics"][0] != ANCHORED_FOREIGN and int(l["topics"][1], 16) == epoch]


def test_an_epoch_is_anchored_on_chain_survives_kill_9_and_is_claimed_with_a_proof(tmp_path, server_factory, ganache):
    deployed = deploy_contracts(ganache)
    # The server holds the anchoring key only, from a file.
    env = {"LEDGERLAKE_EPOCH_GENESIS": "2026-01-01T00:00:00Z", "LEDGERLAKE_EPOCH_LENGTH_S": str(LENGTH), "LEDGERLAKE_EPOCH_GRACE_S": "0",
           "LEDGERLAKE_ANCHOR": "evm", "LEDGERLAKE_EVM_RPC_URL": ganache, "LEDGERLAKE_EVM_KEY_FILE": key_file(GANACHE_KEYS[2]),
           "LEDGERLAKE_EVM_ANCHOR": deployed["anchor"], "LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "1"}
    lake, state = tmp_path / "lake", tmp_path / "state"
    srv = server_factory(lake, state_dir=state, env={**env, "LEDGERLAKE_EPOCH_PAUSE_AFTER_ANCHOR_MS": "120000"})

    # Serve, contribute the answer, serve it again: the second answer is attributed to it.
    text = answer(srv, PROMPT).choices[0].text.strip()
    contributor = keypair()
    approved_datanet(srv, lake, tmp_path, contributor, "stories", [text])
    second = answer(srv, PROMPT)
    [row] = wait_for(lake, second.id)
    assert row["contributor"].lower() == contributor["address"].lower() and int(row["weight"]) == 10**9
    fee = next(f for f in table(lake, "fee_charged") if f["inference_id"] == second.id)
    genesis = 1767225600  # 2026-01-01T00:00:00Z
    epoch = (int(fee["event_time"].timestamp()) - genesis) // LENGTH
    while time.time() < genesis + (epoch + 1) * LENGTH + 0.5:
        time.sleep(0.2)

    # Close with a pause between anchoring and recording, and kill -9 the server in it.
    closing = subprocess.Popen([BIN, "epoch", "close", str(epoch),
                                "--server", srv.url, "--api-key-file", key_file(ADMIN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "pausing between anchoring and recording" not in open(srv.log.name).read() and time.time() < deadline:
        time.sleep(0.1)
    assert anchored_logs(ganache, deployed["anchor"], epoch), "the anchor transaction was mined before the kill"
    srv.kill()
    closing.wait(timeout=60)
    assert closing.returncode != 0
    epochs = DeltaTable(str(lake / "epochs")).to_pyarrow_table().to_pylist()
    assert [(e["epoch"], e["stage"]) for e in epochs] == [(epoch, "pinned")], "killed before the closed row"

    # Closing again finishes without anchoring twice: the contract already holds the root.
    srv = server_factory(lake, state_dir=state, env=env)
    closed = json.loads(run("epoch", "close", str(epoch), "--server", srv.url, "--api-key-file", key_file(ADMIN)))["epoch"]
    logs = anchored_logs(ganache, deployed["anchor"], epoch)
    assert len(logs) == 1
    assert closed["anchor"].lower() == f"evm:1337:{deployed['anchor']}:{logs[0]['transactionHash']}".lower()
    assert logs[0]["topics"][2] == closed["merkle_root"]
    assert evm_call(ganache, deployed["anchor"], "totalOf(uint256)", [epoch]) == int(closed["fees"]) > 0
    assert json.loads(run("epoch", "verify", str(epoch), "--data", str(lake), "--state-dir", str(state), env=env))["verified"] is True
    mine = recompute(str(lake), epoch)
    assert (mine["root"], mine["manifest_sha256"]) == (closed["merkle_root"], closed["manifest_sha256"])

    # The contributor's OPEN, claimed from a separate key (ganache's fourth account).
    proof = requests.get(f"{srv.url}/v1/epochs/{epoch}/proofs/{contributor['address']}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    claim = ("chain", "claim", str(epoch), "--rpc", ganache, "--distributor", deployed["distributor"], "--key-file", key_file(GANACHE_KEYS[3]),
             "--server", srv.url, "--api-key-file", key_file(ADMIN))
    got = json.loads(run(*claim, "--account", contributor["address"]))
    assert got["balance"] == proof["amount"] and int(proof["amount"]) > 0
    assert 0 < got["gas_used"] < 200_000
    assert evm_call(ganache, deployed["distributor"], "paid(uint256)", [epoch]) == int(proof["amount"])

    with pytest.raises(AssertionError, match="AlreadyClaimed"):
        run(*claim, "--account", contributor["address"])
    treasury = next(v["value"] for v in requests.get(f"{srv.url}/v1/epochs/{epoch}/tree", headers={"Authorization": f"Bearer {ADMIN}"}).json()["values"]
                    if v["value"][0].lower() != contributor["address"].lower())
    theirs = requests.get(f"{srv.url}/v1/epochs/{epoch}/proofs/{treasury[0]}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    with pytest.raises(AssertionError, match="InvalidProof"):
        run(*claim, "--account", treasury[0], "--amount", str(int(theirs["amount"]) + 1))
    with pytest.raises(AssertionError, match="InvalidProof"):
        run(*claim, "--account", treasury[0], "--amount", theirs["amount"], "--proof", json.dumps(proof["proof"]))
