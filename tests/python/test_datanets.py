"""Contributors' files become contributions (`ledgerlake contribute`), and datanet snapshots
(`ledgerlake datanet show D[@V]`) follow docs/datanets.md: checked against a
re-implementation of those rules over the Delta tables with the `deltalake` package."""
import datetime
import json

import pytest
from deltalake import DeltaTable

from conftest import ADMIN, key_file, run, signed


def keypair():
    return dict(line.split(": ") for line in run("keys", "new").splitlines())


def write_pdf(path, paragraphs):
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    for p in paragraphs:
        pdf.multi_cell(0, 8, p)
        pdf.ln(8)
    pdf.output(str(path))


def write_docx(path, paragraphs):
    import docx

    d = docx.Document()
    for p in paragraphs:
        d.add_paragraph(p)
    d.save(str(path))


def snapshot_by_the_docs(lake, datanet, version):
    """docs/datanets.md, read with deltalake: the contribution ids whose latest review at
    `version` of contribution_reviewed is `approved`, latest in ingest order (no client's
    clock decides; `event_time` only breaks ties within one commit)."""
    reviews = DeltaTable(str(lake / "contribution_reviewed"), version=version).to_pyarrow_table().to_pylist()
    latest = {}
    for r in reviews:
        if r["datanet_id"] != datanet:
            continue
        key = (r["ingested_at"], r["event_time"], r["event_id"])
        if r["contribution_id"] not in latest or latest[r["contribution_id"]][0] < key:
            latest[r["contribution_id"]] = (key, r["verdict"])
    return sorted(c for c, (_, v) in latest.items() if v == "approved")


def review(srv, owner, datanet, contribution_id, verdict, event_id, event_time=None):
    """The owner's review, signed for `srv`'s deployment (`ledgerlake sign review`), timed
    now unless `event_time` is given."""
    args = ["sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "review", "--contribution", contribution_id,
            "--datanet", datanet, "--verdict", verdict, "--event-id", event_id]
    if event_time is not None:
        args += ["--event-time", event_time]
    if verdict != "approved":
        args += ["--reason", "off topic"]
    out = json.loads(run(*args))
    event = out["event"]
    assert (event["kind"], event["reviewer"], event["verdict"]) == ("contribution.reviewed", owner["address"], verdict), out
    return event


def ago(seconds):
    """RFC 3339 UTC time `seconds` before now."""
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def show(lake, at):
    return json.loads(run("datanet", "show", at, "--json", "--data", str(lake)))


def test_contribute_files_then_snapshots_follow_reviews(tmp_path, server_factory):
    lake = tmp_path / "lake"
    srv = server_factory(lake)
    owner, alice = keypair(), keypair()
    created = signed(srv, owner["private_key"], {"kind": "datanet.created", "event_id": "d-zub", "datanet_id": "zubrovia",
                                                 "owner": owner["address"], "name": "Zubrovia facts", "license": "CC-BY-4.0"})
    assert srv.post(json.dumps(created), content_type="application/json").json()["accepted"] == 1

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.md").write_text(
        "# Zubrovia\n\nThe capital of Zubrovia is Kessel.\n\n"
        "Kessel lies on the river Vorn, which freezes every winter.\n\n"
        "Zubrovia's national dish is smoked barley with plums.\n")
    write_pdf(docs / "report.pdf", ["The Zubrovian parliament has 91 seats.",
                                    "Its currency is the zubrovian mark, divided into 40 pennies."])
    write_docx(docs / "memo.docx", ["Trade & fishing: Zubrovia exports herring.", "Its highest peak is Mount Élan."])
    files = [str(docs / n) for n in ("notes.md", "report.pdf", "memo.docx")]
    args = ["contribute", "--datanet", "zubrovia", "--key-file", key_file(alice["private_key"]), "--chunk-bytes", "70",
            "--server", srv.url, "--api-key-file", key_file(ADMIN)]
    out = run(*args, *files)
    assert "notes.md: 3 chunks" in out and "report.pdf: 2 chunks" in out and "memo.docx: 2 chunks" in out, out
    assert "contributed 7 chunks to zubrovia" in out and "7 new, 0 already there" in out, out
    # Again: nothing new.
    assert "0 new, 7 already there" in run(*args, *files)

    rows = DeltaTable(str(lake / "contribution_submitted")).to_pyarrow_table().to_pylist()
    assert len(rows) == 7
    by_source = {r["source"]: r for r in rows}
    assert set(by_source) == {"notes.md#0", "notes.md#1", "notes.md#2", "report.pdf#0", "report.pdf#1",
                              "memo.docx#0", "memo.docx#1"}
    assert all(r["contributor"] == alice["address"] for r in rows)
    # Paragraphs are packed while they fit: the heading and the first sentence share a chunk.
    assert by_source["notes.md#0"]["content"] == "# Zubrovia\n\nThe capital of Zubrovia is Kessel."
    assert by_source["notes.md#1"]["content"] == "Kessel lies on the river Vorn, which freezes every winter."
    assert by_source["report.pdf#0"]["content"] == "The Zubrovian parliament has 91 seats."
    assert by_source["report.pdf#1"]["content"] == "Its currency is the zubrovian mark, divided into 40 pennies."
    assert by_source["memo.docx#0"]["content"] == "Trade & fishing: Zubrovia exports herring."
    assert by_source["memo.docx#1"]["content"] == "Its highest peak is Mount Élan."

    # A file that is not what its name says: refused by name, and nothing of the batch is sent.
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (docs / "more.md").write_text("A sentence that must not arrive.")
    from conftest import BIN
    import subprocess
    bad = subprocess.run([BIN, *args, str(docs / "more.md"), str(docs / "broken.pdf")], capture_output=True, text=True)
    assert bad.returncode != 0 and "broken.pdf" in bad.stderr and "not a readable PDF" in bad.stderr, bad.stderr
    assert DeltaTable(str(lake / "contribution_submitted")).to_pyarrow_table().num_rows == 7

    # Before any review the snapshot is empty, at version 0.
    empty = show(lake, "zubrovia")
    assert (empty["version"], empty["contributions"], empty["visibility"]) == (0, 0, "private")

    ids = {s: r["contribution_id"] for s, r in by_source.items()}
    # Two minutes before the first reviews are signed (used below).
    earlier = ago(120)
    first = [review(srv, owner, "zubrovia", ids["notes.md#1"], "approved", "r1"),
             review(srv, owner, "zubrovia", ids["report.pdf#0"], "approved", "r2"),
             review(srv, owner, "zubrovia", ids["memo.docx#0"], "approved", "r3"),
             review(srv, owner, "zubrovia", ids["notes.md#2"], "rejected", "r4")]
    assert srv.post(json.dumps(first), content_type="application/json").json()["accepted"] == 4
    at_first = show(lake, "zubrovia")
    v1 = at_first["version"]
    assert at_first["contributions"] == 3 and at_first["excluded"] == 1 and at_first["contributors"] == 1
    assert at_first["contribution_ids"] == snapshot_by_the_docs(lake, "zubrovia", v1)
    assert at_first["snapshot"] == f"zubrovia@{v1}"

    # Flagging one and approving the rejected one moves the newest snapshot, not the pinned one.
    # The latest review is the last ingested, whatever its event_time says: the flag is timed
    # before the approval it overrides (within the server's skew bound).
    second = [review(srv, owner, "zubrovia", ids["report.pdf#0"], "flagged", "r5", event_time=earlier),
              review(srv, owner, "zubrovia", ids["notes.md#2"], "approved", "r6")]
    assert srv.post(json.dumps(second), content_type="application/json").json()["accepted"] == 2
    latest = show(lake, "zubrovia")
    assert latest["version"] > v1
    assert latest["contribution_ids"] == snapshot_by_the_docs(lake, "zubrovia", latest["version"])
    assert ids["report.pdf#0"] not in latest["contribution_ids"] and ids["notes.md#2"] in latest["contribution_ids"]
    assert show(lake, f"zubrovia@{v1}") == at_first

    # The owner makes it public; the plain output says so.
    update = {"kind": "datanet.updated", "event_id": "u1", "datanet_id": "zubrovia", "updated_by": owner["address"],
              "visibility": "public"}
    # Unsigned, signed by someone else, or signed for another event id: refused, naming the
    # signature, whatever key sends it.
    mallory = keypair()
    owners_update = signed(srv, owner["private_key"], update)
    for bad in [update | {"event_time": owners_update["event_time"]}, signed(srv, mallory["private_key"], update),
                owners_update | {"event_id": "u1-replayed"}]:
        r = srv.post(json.dumps(bad), content_type="application/json")
        assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["signature"], (bad, r.text)
    # Signed by the owner but timed outside the server's skew bound: refused, naming the time.
    stale = signed(srv, owner["private_key"], update | {"event_id": "u1-stale", "event_time": ago(3600)})
    r = srv.post(json.dumps(stale), content_type="application/json")
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["event_time"], r.text
    assert show(lake, "zubrovia")["visibility"] == "private"
    assert srv.post(json.dumps(owners_update), content_type="application/json").json()["accepted"] == 1
    text = run("datanet", "show", "zubrovia", "--data", str(lake))
    assert "active, public" in text and f"zubrovia@{latest['version']}" in text, text

    for at, says in [("nope", "datanet nope does not exist"), ("zubrovia@999", "no version 999"), ("zubrovia@x", "not a table version")]:
        r = subprocess.run([BIN, "datanet", "show", at, "--data", str(lake)], capture_output=True, text=True)
        assert r.returncode != 0 and says in r.stderr, (at, r.stderr)
