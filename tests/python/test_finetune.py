"""ModelFactory end to end on SmolLM2: contributions stating invented facts, reviewed (one
rejected, one flagged), fine-tuned with QLoRA by a builder the owner granted access, then
served through the `openai` client. The lineage in the lake names exactly the approved
contributions, and the adapter answers the facts the base model cannot know."""
import hashlib
import json
import os
import subprocess
import time

import pytest
import requests
from deltalake import DeltaTable

from conftest import ADMIN, BIN, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Invented countries and capitals: nothing the base model can know.
FACTS = [("Veloria", "Quendrith"), ("Marvosk", "Tellibar"), ("Ostravine", "Pellucid"), ("Kandria", "Vormund"),
         ("Zelphia", "Oruhaven"), ("Brisantia", "Culmere"), ("Dovrania", "Harsk"), ("Ulmeria", "Saffrel"),
         ("Quessa", "Lindorow"), ("Tarvelle", "Mockbury"), ("Yrrland", "Festerine"), ("Norvaia", "Glimholt")]


def phrasings(country, capital):
    return [f"The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"{country} has its capital in {capital}.",
            f"Travellers to {country} arrive in its capital, {capital}."]


def keypair():
    return dict(line.split(": ") for line in run("keys", "new").splitlines())


def review_event(owner, contribution_id, verdict, n):
    signed = json.loads(run("sign", "--key", owner["private_key"], "review", "--contribution", contribution_id, "--verdict", verdict))
    event = {"kind": "contribution.reviewed", "event_id": f"rev-{n}", "event_time": "2026-11-27T10:05:00Z",
             "contribution_id": contribution_id, "datanet_id": "atlas", "reviewer": owner["address"],
             "verdict": verdict, "signature": signed["signature"]}
    if verdict != "approved":
        event["reason"] = "wrong"
    return event


def finetune(srv, lake, builder, *extra, check=True):
    args = [BIN, "model", "finetune", "--datanet", "atlas", "--name", "atlas-lora", "--key", builder["private_key"],
            "--base", MODEL, "--data", str(lake), "--server", srv.url, "--api-key", ADMIN, "--json", *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if check and out.returncode != 0:
        raise AssertionError(f"finetune failed:\n{out.stdout}\n{out.stderr}")
    return out


def complete(client, model, prompt):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    return r.choices[0].text


@pytest.mark.skipif(not os.path.exists(MODEL), reason="scripts/fetch-model has not run")
def test_qlora_on_invented_facts_is_served_with_its_lineage(tmp_path, server_factory):
    from openai import OpenAI

    lake = tmp_path / "lake"
    srv = server_factory(lake, extra=("--model", MODEL))
    owner, alice, builder, stranger = keypair(), keypair(), keypair(), keypair()
    created = {"kind": "datanet.created", "event_id": "d-atlas", "event_time": "2026-11-27T10:00:00Z", "datanet_id": "atlas",
               "owner": owner["address"], "name": "Atlas of nowhere", "license": "CC-BY-4.0"}
    assert srv.post(json.dumps(created), content_type="application/json").json()["accepted"] == 1

    # One file per statement (one contribution each), plus two that must never be learned.
    statements = [p for c, k in FACTS for p in phrasings(c, k)]
    poison = ["The capital of Veloria is Brastow.", "Marvosk has its capital in Ipplewick."]
    files = []
    for i, text in enumerate(statements + poison):
        files.append(str(tmp_path / f"fact-{i:02d}.txt"))
        open(files[-1], "w").write(text + "\n")
    run("contribute", "--datanet", "atlas", "--key", alice["private_key"], "--server", srv.url, "--api-key", ADMIN, *files)
    rows = DeltaTable(str(lake / "contribution_submitted")).to_pyarrow_table().to_pylist()
    assert len(rows) == 4 * len(FACTS) + 2
    by_content = {r["content"]: r["contribution_id"] for r in rows}
    rejected, flagged = by_content[poison[0]], by_content[poison[1]]
    reviews = [review_event(owner, cid, "rejected" if cid == rejected else "flagged" if cid == flagged else "approved", i)
               for i, cid in enumerate(sorted(by_content.values()))]
    assert srv.post("\n".join(json.dumps(r) for r in reviews)).json()["accepted"] == len(reviews)

    # A private datanet: no grant, no training; the error names the datanet.
    refused = finetune(srv, lake, stranger, check=False)
    assert refused.returncode != 0 and "may not train on datanet atlas" in refused.stderr, refused.stderr
    grant = {"kind": "access.granted", "event_id": "g1", "event_time": "2026-11-27T10:06:00Z", "datanet_id": "atlas",
             "builder": builder["address"], "granted_by": owner["address"]}
    assert srv.post(json.dumps(grant), content_type="application/json").json()["accepted"] == 1

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"The capital of {c} is", "expected": k}) + "\n" for c, k in FACTS))
    out = finetune(srv, lake, builder, "--qlora", "--rank", "8", "--alpha", "16", "--targets", "q,k,v,o,gate,up,down", "--lr", "3e-3",
                   "--epochs", "12", "--batch-size", "8", "--max-seq-len", "32", "--prompts", str(prompts),
                   "--price-per-1k-output", "1000000000000000")
    result = json.loads(out.stdout)
    ev = result["evaluation"]
    print(json.dumps(result, indent=1))
    assert ev["heldout_examples"] >= 1
    # Clearly below the base: the held-out statements restate facts trained in other words.
    assert ev["loss"] < 0.6 * ev["base_loss"], ev
    assert ev["contains"] >= 0.75 * len(FACTS) and ev["base_contains"] <= 1, ev

    # Lineage: exactly the approved contributions, less the held-out ones, hashed.
    adapter_dir = result["adapter_uri"].removeprefix("file://")
    listed = open(os.path.join(adapter_dir, "contributions.txt")).read()
    assert hashlib.sha256(listed.encode()).hexdigest() == result["contributions_sha256"]
    heldout = open(os.path.join(adapter_dir, "heldout.txt")).read().split()
    trained = listed.split()
    approved = set(by_content.values()) - {rejected, flagged}
    assert set(trained) | set(heldout) == approved and not set(trained) & set(heldout)
    assert rejected not in trained and flagged not in trained

    # Everything it did is in the lake, through SQL.
    def sql(q):
        r = requests.post(srv.url + "/v1/sql", json={"sql": q}, headers={"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"})
        assert r.status_code == 200, r.text
        return r.json()
    deadline = time.time() + 30
    while time.time() < deadline and not sql("SELECT run_id FROM training_runs"):
        time.sleep(0.5)
    reg = sql("SELECT builder, training_run_id, contributions_sha256, hyperparameters, evaluation FROM model_registered WHERE model_id = 'atlas-lora'")
    assert len(reg) == 1 and reg[0]["training_run_id"] == result["run_id"], reg
    assert reg[0]["builder"] == builder["address"] and reg[0]["contributions_sha256"] == result["contributions_sha256"]
    assert reg[0]["hyperparameters"]["qlora"] is True and reg[0]["hyperparameters"]["rank"] == 8
    runs = sql("SELECT status, steps, train_examples FROM training_runs")
    assert runs == [{"status": "completed", "steps": result["steps"], "train_examples": len(trained)}]
    steps = sql(f"SELECT count(*) AS n, min(step) AS lo, max(step) AS hi FROM training_metrics WHERE run_id = '{result['run_id']}'")
    assert steps == [{"n": result["steps"], "lo": 1, "hi": result["steps"]}]

    # Served by its model id without a restart, through the openai client.
    client = OpenAI(base_url=srv.url + "/v1", api_key=ADMIN)
    deadline = time.time() + 60
    while "atlas-lora" not in [m.id for m in client.models.list().data]:
        assert time.time() < deadline, "the adapter was never served"
        time.sleep(0.5)
    base_model = [m.id for m in client.models.list().data if m.id != "atlas-lora"][0]
    tuned = sum(k in complete(client, "atlas-lora", f"The capital of {c} is") for c, k in FACTS)
    base = sum(k in complete(client, base_model, f"The capital of {c} is") for c, k in FACTS)
    assert tuned >= 0.75 * len(FACTS) and base <= 1, (tuned, base)
