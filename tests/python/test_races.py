"""State rules hold across writers: two `ledgerlake up` processes (each with its own state
directory, as two writers must run) on one lake, local and on S3. Contested events sent to
both, at the same moment and seconds apart, are stored exactly once; the other process
answers 422 naming the field; a contribution sent to one process for a datanet created
through the other is accepted; and each process's index agrees with the tables."""
import json
import threading
import time
import uuid

import pytest
from deltalake import DeltaTable

from conftest import key_file, run, signed
from test_s3 import s3  # noqa: F401  (the moto fixture)

# Participant events are signed (EIP-712) for the lake's deployment, which both processes
# share, and timed now (the CLI fills in the time): any process takes them.


def keypair():
    out = run("keys", "new")
    fields = dict(line.split(": ", 1) for line in out.strip().splitlines())
    return fields["private_key"], fields["address"]


def created(server, datanet, owner):
    """`datanet.created` of `datanet` by `owner` (a keypair() pair), signed by the owner."""
    key, address = owner
    return signed(server, key, {"kind": "datanet.created", "event_id": f"c-{uuid.uuid4().hex}", "datanet_id": datanet,
                                "owner": address, "name": datanet, "license": "CC-BY-4.0"})


def contribution(server, key, datanet, content, event_id=None):
    out = json.loads(run("sign", "--key-file", key_file(key), "--server", server.url, "contribution", "--datanet", datanet, "--content", content,
                         "--license", "CC-BY-4.0", "--event-id", event_id or f"s-{uuid.uuid4().hex}"))
    return out["event"], out["contribution_id"]


def review(server, key, datanet, contribution_id, verdict):
    args = ["sign", "--key-file", key_file(key), "--server", server.url, "review", "--contribution", contribution_id, "--datanet", datanet,
            "--verdict", verdict, "--event-id", f"r-{uuid.uuid4().hex}"]
    if verdict != "approved":
        args += ["--reason", "contradicts the other review"]
    return json.loads(run(*args))["event"]


def post(server, events):
    return server.post("\n".join(json.dumps(e) for e in events))


def at_once(*calls):
    """Runs each (server, events) post in its own thread, released together."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def go(i, server, events):
        barrier.wait()
        results[i] = post(server, events)

    threads = [threading.Thread(target=go, args=(i, s, e)) for i, (s, e) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def table(read, name):
    try:
        return read(name)
    except Exception as e:  # a table never written
        if "no log files" in str(e).lower() or "not a delta table" in str(e).lower() or "not found" in str(e).lower():
            return []
        raise


def contested_creations_are_stored_once(a, b, read):
    x, y = keypair(), keypair()
    results = {}
    # 20 ids sent to both processes at the same moment, 20 more a few seconds apart.
    same = [f"race-now-{i}" for i in range(20)]
    to_a, to_b = [created(a, d, x) for d in same], [created(a, d, y) for d in same]
    ra, rb = at_once((a, to_a), (b, to_b))
    results["same moment"] = (ra, rb)
    later = [f"race-later-{i}" for i in range(20)]
    to_a, to_b = [created(a, d, x) for d in later], [created(a, d, y) for d in later]
    first = post(a, to_a)
    time.sleep(2)
    second = post(b, to_b)
    results["seconds apart"] = (first, second)
    assert second.status_code == 422 and second.json()["accepted"] == 0
    assert all(e["field"] == "datanet_id" and "already exists" in e["message"] for e in second.json()["errors"])

    for what, (ra, rb) in results.items():
        for r in (ra, rb):
            assert r.status_code in (200, 422), r.text
        accepted = ra.json()["accepted"] + rb.json()["accepted"]
        refused = len(ra.json()["errors"]) + len(rb.json()["errors"])
        assert (accepted, refused) == (20, 20), (what, ra.json(), rb.json())
    rows = table(read, "datanet_created")
    by_id = {}
    for r in rows:
        by_id.setdefault(r["datanet_id"], []).append(r["owner"])
    assert all(len(by_id[d]) == 1 for d in same + later), {d: o for d, o in by_id.items() if len(o) > 1}

    # Each index agrees with the table: a second creation is refused by both processes.
    for server in (a, b):
        again = post(server, [created(a, same[0], y), created(a, later[0], x)])
        assert again.status_code == 422 and again.json()["accepted"] == 0, again.text


def a_contribution_to_a_datanet_of_the_other_process_is_accepted(a, b, read):
    owner, other = keypair(), keypair()
    assert post(a, [created(a, "made-on-a", owner)]).json()["accepted"] == 1
    content = "Sea levels rose 20 cm since 1900."
    event, cid = contribution(b, owner[0], "made-on-a", content)
    r = post(b, [event])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert [c["datanet_id"] for c in table(read, "contribution_submitted")] == ["made-on-a"]
    # The first submission keeps the contribution id: the same content signed by someone
    # else and sent to the other process is refused there, naming the contribution id.
    copy, same_cid = contribution(a, other[0], "made-on-a", content)
    assert same_cid == cid
    r = post(a, [copy])
    assert r.status_code == 422 and r.json()["accepted"] == 0, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["contribution_id"], r.text
    assert [c["contributor"] for c in table(read, "contribution_submitted")] == [owner[1]]


def contradictory_reviews_keep_only_the_owners(a, b, read):
    (key_x, owner_x), (key_y, owner_y), (key_c, _) = keypair(), keypair(), keypair()
    # Both processes are told to create the same datanet, for different owners, and each
    # gets that owner's review of the same contribution in the same request.
    submitted, cid = contribution(a, key_c, "disputed", "The tide comes in twice a day.", event_id="s-disputed")
    to_a = [created(a, "disputed", (key_x, owner_x)), submitted, review(a, key_x, "disputed", cid, "approved")]
    to_b = [created(a, "disputed", (key_y, owner_y)), submitted, review(a, key_y, "disputed", cid, "rejected")]
    ra, rb = at_once((a, to_a), (b, to_b))
    owners = [r["owner"] for r in table(read, "datanet_created") if r["datanet_id"] == "disputed"]
    assert len(owners) == 1
    winner, loser = (ra, rb) if owners[0] == owner_x else (rb, ra)
    assert winner.status_code == 200 and winner.json()["accepted"] + winner.json()["duplicates"] == 3, winner.text
    assert loser.status_code == 422, loser.text
    fields = sorted(e["field"] for e in loser.json()["errors"])
    assert fields == ["datanet_id", "reviewer"], loser.text
    reviews = [r for r in table(read, "contribution_reviewed") if r["datanet_id"] == "disputed"]
    assert [r["reviewer"] for r in reviews] == [owners[0]]
    assert len([c for c in table(read, "contribution_submitted") if c["datanet_id"] == "disputed"]) == 1
    # The losing process now knows the real owner: the owner's next review is accepted there.
    owner_key = key_x if owners[0] == owner_x else key_y
    loser_server = b if owners[0] == owner_x else a
    r = post(loser_server, [review(a, owner_key, "disputed", cid, "flagged")])
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text


def check_all(a, b, read):
    contested_creations_are_stored_once(a, b, read)
    a_contribution_to_a_datanet_of_the_other_process_is_accepted(a, b, read)
    contradictory_reviews_keep_only_the_owners(a, b, read)


def test_state_rules_hold_across_two_local_writers(tmp_path, server_factory):
    lake = tmp_path / "lake"
    a = server_factory(lake, state_dir=tmp_path / "state-a")
    b = server_factory(lake, state_dir=tmp_path / "state-b")

    def read(name):
        return DeltaTable(str(lake / name)).to_pyarrow_table().to_pylist()

    check_all(a, b, read)


def test_state_rules_hold_across_two_writers_on_s3(tmp_path, server_factory, s3):  # noqa: F811
    uri = "s3://lake/races"
    a = server_factory(uri, state_dir=tmp_path / "state-a", env=s3)
    b = server_factory(uri, state_dir=tmp_path / "state-b", env=s3)
    options = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true"}

    def read(name):
        return DeltaTable(f"{uri}/{name}", storage_options=options).to_pyarrow_table().to_pylist()

    check_all(a, b, read)
