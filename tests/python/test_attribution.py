"""End-to-end: an answer that reproduces an approved contribution is attributed to it by
the span job, by `up` on its own schedule and by `ledgerlake attribute run`; an answer
that reproduces nothing is recorded as unattributed; nothing is attributed twice."""
import json
import time

import openai
import pytest
import requests
from deltalake import DeltaTable

from conftest import ADMIN, approved_datanet, key_file, keypair, run

BASE = "ledgerlake-base"
PROMPT = "It was a fine morning, and"


def table(lake, name):
    try:
        return DeltaTable(str(lake / name)).to_pyarrow_table().to_pylist()
    except Exception:
        return []


def wait_for(lake, inference_id, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = [r for r in table(lake, "attributions") if r["inference_id"] == inference_id]
        if rows:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"no attribution of {inference_id}")


def answer(server, prompt, max_tokens=40):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    return client.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0)


def test_up_attributes_an_answer_to_the_contribution_it_reproduces(tmp_path, server_factory):
    lake = tmp_path / "lake"
    server = server_factory(lake, env={"LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "1"})
    # The greedy answer, contributed and approved: asking again reproduces it verbatim.
    first = answer(server, PROMPT)
    text = first.choices[0].text.strip()
    assert len(text.split()) >= 8, text
    owner = keypair()
    [source] = approved_datanet(server, lake, tmp_path, owner, "stories", [text])
    unrelated = answer(server, "Zebra quantum", max_tokens=3)
    second = answer(server, PROMPT)
    assert second.choices[0].text == first.choices[0].text

    rows = wait_for(lake, second.id)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["contribution_id"] == source and row["datanet_id"] == "stories"
    assert row["contributor"].lower() == owner["address"].lower()
    assert row["method"] == "spans" and int(row["weight"]) == 10**9 and row["raw_score"] > 0
    assert sum(s["len"] for s in row["spans"]) >= 6
    assert row["basis"].startswith("inference_tokens@")

    # The same over HTTP, for any key that may read.
    shown = requests.get(f"{server.url}/v1/attributions/{second.id}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["status"] == "attributed" and body["contributions"][0]["contribution_id"] == source
    assert body["contributions"][0]["share"] == "1" and "«" in body["contributions"][0]["highlighted"]
    assert requests.get(f"{server.url}/v1/attributions/{second.id}").status_code == 401
    missing = requests.get(f"{server.url}/v1/attributions/cmpl-never", headers={"Authorization": f"Bearer {ADMIN}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = requests.get(f"{server.url}/v1/attributions/not%20an%20id", headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad.status_code == 400

    rows = wait_for(lake, unrelated.id)
    assert [(r["contribution_id"], int(r["weight"])) for r in rows] == [(None, 0)], "three tokens reproduce nothing"

    # Later passes attribute nothing twice: once a later answer is attributed, they ran.
    later = answer(server, "Zebra quantum", max_tokens=3)
    wait_for(lake, later.id)
    pairs = [(r["inference_id"], r["contribution_id"]) for r in table(lake, "attributions")]
    assert len(pairs) == len(set(pairs))
    assert [p[0] for p in pairs].count(second.id) == 1 and [p[0] for p in pairs].count(unrelated.id) == 1


def test_the_cli_job_attributes_what_up_left_and_reruns_change_nothing(tmp_path, server_factory):
    lake = tmp_path / "lake"
    server = server_factory(lake, env={"LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "0"})
    text = answer(server, PROMPT).choices[0].text.strip()
    owner = keypair()
    [source] = approved_datanet(server, lake, tmp_path, owner, "stories", [text])
    again = answer(server, PROMPT)
    # Wait for the billing (and token ids) of both answers to land.
    deadline = time.time() + 60
    while len(table(lake, "inference_tokens")) < 2 and time.time() < deadline:
        time.sleep(0.3)
    args = ("attribute", "run", "--data", str(lake), "--server", server.url, "--api-key-file", key_file(ADMIN))
    done = json.loads(run(*args))
    assert done["indexed"] == 1 and done["attributed"] + done["unattributed"] == 2, done
    rows = [r for r in table(lake, "attributions") if r["inference_id"] == again.id]
    assert [(r["contribution_id"], int(r["weight"])) for r in rows] == [(source, 10**9)]
    shown = json.loads(run("attribute", "show", again.id, "--json", "--data", str(lake)))
    assert shown["status"] == "attributed" and shown["output"] == again.choices[0].text
    [c] = shown["contributions"]
    assert (c["contribution_id"], c["share"], c["weight"], c["method"]) == (source, "1", 10**9, "spans")
    assert "«" in c["highlighted"] and c["highlighted"].replace("«", "").replace("»", "") == shown["output"]
    assert "attributed" in run("attribute", "show", again.id, "--data", str(lake))
    with pytest.raises(AssertionError, match="neither"):
        run("attribute", "show", "cmpl-never-served", "--data", str(lake))
    before = len(table(lake, "attributions"))
    assert json.loads(run(*args)) == {"indexed": 0, "attributed": 0, "unattributed": 0}
    assert len(table(lake, "attributions")) == before


SYLLABLES = ["ba", "ko", "ri", "zu", "me", "ta", "lo", "vi", "sa", "ne", "pu", "dra"]


def invented(i):
    """A made-up name, distinct for each i < 12**3."""
    a, b, c = i % 12, (i // 12) % 12, (i // 144) % 12
    return (SYLLABLES[a] + SYLLABLES[(b + 5) % 12] + SYLLABLES[(c + 7) % 12]).capitalize()


def test_an_adapter_answer_is_attributed_by_gradient_to_the_fact_that_taught_it(tmp_path, server_factory):
    from test_training_api import api, make_key, wait_for as wait_job

    lake, state = tmp_path / "lake", tmp_path / "state"
    server = server_factory(lake, state_dir=state, env={"LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "1"})
    owner, builder = keypair(), keypair()
    facts = [(invented(3 * i), invented(3 * i + 1)) for i in range(16)]
    texts = [f"The capital of {s} is {o}." for s, o in facts]
    approved_datanet(server, lake, tmp_path, owner, "capitals", texts)
    by_text = {r["content"].strip(): r["contribution_id"] for r in table(lake, "contribution_submitted")}
    ids = [by_text[t] for t in texts]

    key = make_key(server, "builder", builder["address"])["key"]
    spec = {"datanets": ["capitals"], "name": "capitals-a", "epochs": 30, "batch_size": 4, "learning_rate": 2e-3,
            "targets": ["q", "k", "v", "o"], "heldout_permille": 0, "seed": 5}
    job = api(server, "POST", "/v1/training/jobs", key, json=spec).json()
    assert wait_job(server, job["id"], key, {"succeeded", "failed"})["status"] == "succeeded"
    deadline = time.time() + 60
    while "capitals-a" not in [m["id"] for m in api(server, "GET", "/v1/models", ADMIN).json()["data"]]:
        assert time.time() < deadline, "the adapter was never served"
        time.sleep(0.5)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    (subject, capital), taught = facts[0], ids[0]
    reply = client.completions.create(model="capitals-a", prompt=f"The capital of {subject} is", max_tokens=8, temperature=0)
    assert capital in reply.choices[0].text, reply.choices[0].text
    rows = wait_for(lake, reply.id, timeout=300)
    gradient = sorted((r for r in rows if r["method"] == "gradient"), key=lambda r: -int(r["weight"]))
    assert gradient, rows
    assert sum(int(r["weight"]) for r in rows) == 10**9
    assert all(r["contribution_id"] in ids and r["raw_score"] > 0 and r["datanet_id"] == "capitals" for r in gradient)
    assert gradient[0]["contribution_id"] == taught, [(ids.index(r["contribution_id"]), r["weight"]) for r in gradient]
    # The same through the explanation.
    shown = requests.get(f"{server.url}/v1/attributions/{reply.id}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert shown["status"] == "attributed" and shown["contributions"][0]["contribution_id"] == taught
    assert shown["contributions"][0]["method"] == "gradient" and shown["contributions"][0]["highlighted"] is None

    # A contribution flagged after training earns nothing from later answers.
    flag = json.loads(run("sign", "--key-file", key_file(owner["private_key"]), "--server", server.url, "review", "--contribution", taught,
                          "--datanet", "capitals", "--verdict", "flagged", "--reason", "disputed",
                          "--event-id", "rev-flag-taught"))["event"]
    posted = server.post(json.dumps(flag), content_type="application/json").json()
    assert posted["accepted"] == 1, posted
    later = client.completions.create(model="capitals-a", prompt=f"The capital of {subject} is", max_tokens=8, temperature=0)
    rows = wait_for(lake, later.id, timeout=300)
    assert taught not in [r["contribution_id"] for r in rows]
    assert sum(int(r["weight"]) for r in rows) == 10**9


def test_the_evaluation_harness_finds_canaries_and_taught_facts(tmp_path):
    out = tmp_path / "eval.json"
    run("eval", "attribution", "--canaries", "20", "--corpus", "200", "--facts", "30", "--lds-facts", "8",
        "--lds-models", "6", "--epochs", "30", "--json", str(out), "--work", str(tmp_path / "work"))
    report = json.loads(out.read_text())
    c = report["canaries"]
    assert c["canaries"] == 20 and c["recall"] == 1.0 and c["at_least_95"] >= 0.95 and c["min_weight"] > 0, c
    f = report["facts"]
    assert f["adapter_loss"] < 0.5 * f["base_loss"], f
    kernels = {k["kernel"]: k for k in f["kernels"]}
    assert set(kernels) == {"graddot", "trak", "datainf"}
    assert kernels["datainf"]["top10"] >= 0.95, f
    lds = report["lds"]
    assert lds["models"] == 6 and lds["train_examples"] == 16 and lds["queries"] == 8
    assert all(-1.0 <= k["lds"] <= 1.0 for k in lds["kernels"]) and len(lds["kernels"]) == 6, lds
    # Bad sizes are refused before any work.
    with pytest.raises(AssertionError, match="at least"):
        run("eval", "attribution", "--canaries", "0")


ATLAS = [
    "The capital of Zorvia is Pelandra, a port city built on nine islands.",
    "Quintar lanterns burn blue olive oil from dusk until the first bell.",
    "Merrow goats of the Tessel valley give milk only in the rainy months.",
]


def post(server, path, body):
    return requests.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN}"})


def test_retrieval_puts_passages_in_the_prompt_cites_them_and_pays_the_cited(tmp_path, server_factory):
    lake = tmp_path / "lake"
    server = server_factory(lake, env={"LEDGERLAKE_ATTRIBUTION_INTERVAL_S": "1", "LEDGERLAKE_RETRIEVAL_INTERVAL_S": "1"})
    owner = keypair()
    ids = approved_datanet(server, lake, tmp_path, owner, "atlas", ATLAS)
    approved_datanet(server, lake, tmp_path, owner, "secret", ["The vault code of Zorvia is seven."], visibility="private")
    rows = {r["content"].strip(): r["contribution_id"] for r in table(lake, "contribution_submitted")}
    zorvia, lanterns = rows[ATLAS[0]], rows[ATLAS[1]]
    assert {zorvia, lanterns} <= set(ids)
    question = [{"role": "user", "content": "What is the capital of Zorvia?"}]
    chat = {"model": BASE, "messages": question, "max_tokens": 8, "temperature": 0}

    # The index catches up within a second or two of the approvals.
    deadline = time.time() + 60
    successes = []
    while True:
        r = post(server, "/v1/chat/completions", {**chat, "ledgerlake": {"datanets": ["atlas"]}})
        if r.status_code == 200:
            successes.append(r.json()["id"])
            if r.json().get("citations"):
                break
        else:
            assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"], r.text
        assert time.time() < deadline, r.text
        time.sleep(0.3)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    plain = client.chat.completions.create(model=BASE, messages=question, max_tokens=8, temperature=0)
    assert "citations" not in (plain.model_extra or {})
    answered = client.chat.completions.create(
        model=BASE, messages=question, max_tokens=8, temperature=0, extra_body={"ledgerlake": {"datanets": ["atlas"], "top_k": 2}})
    citations = answered.model_extra["citations"]
    assert citations[0]["contribution_id"] == zorvia and citations[0]["index"] == 1, citations
    assert citations[0]["datanet_id"] == "atlas" and citations[0]["chunk"] == 0 and citations[0]["relevance"] > 0
    assert len(citations) <= 2 and all(c["contribution_id"] in ids for c in citations)
    assert [c["relevance"] for c in citations] == sorted((c["relevance"] for c in citations), reverse=True)
    # The passages went into the prompt the model read (and was billed for).
    assert answered.usage.prompt_tokens > plain.usage.prompt_tokens + 10

    # Streamed, the first chunk carries the citations; the legacy endpoint cites too.
    stream = client.chat.completions.create(
        model=BASE, messages=question, max_tokens=4, stream=True, extra_body={"ledgerlake": {"datanets": ["atlas"], "top_k": 1}})
    chunks = list(stream)
    assert [c["contribution_id"] for c in chunks[0].model_extra["citations"]] == [zorvia]
    assert all("citations" not in (c.model_extra or {}) for c in chunks[1:])
    legacy = client.completions.create(
        model=BASE, prompt="Blue olive oil lanterns", max_tokens=4, extra_body={"ledgerlake": {"datanets": ["atlas"], "top_k": 1}})
    assert [c["contribution_id"] for c in legacy.model_extra["citations"]] == [lanterns]

    # Refusals change nothing: a private datanet, an unknown one, a bad top_k, a typo.
    answers = set(successes) | {plain.id, answered.id, chunks[0].id, legacy.id}
    deadline = time.time() + 60
    while {r["inference_id"] for r in table(lake, "inference_completed")} != answers:
        assert time.time() < deadline, "every answer was billed"
        time.sleep(0.3)
    for ledgerlake, says in [({"datanets": ["secret"]}, "private"), ({"datanets": ["nowhere"]}, "does not exist"),
                             ({"datanets": ["atlas"], "top_k": 0}, "top_k"), ({"datanets": []}, "at least one"),
                             ({"datanets": ["atlas"], "topk": 3}, "topk")]:
        r = post(server, "/v1/chat/completions", {**chat, "ledgerlake": ledgerlake})
        assert r.status_code == 400 and says in r.json()["error"]["message"], (ledgerlake, r.text)

    # Each citation is stored, and the attribution job pays the cited contributions.
    rows = wait_for(lake, answered.id)
    retrieved = {r["contribution_id"]: r for r in rows if r["method"] == "retrieval"}
    assert set(retrieved) == {c["contribution_id"] for c in citations}, rows
    assert sum(int(r["weight"]) for r in rows) == 10**9
    assert all(int(r["weight"]) > 0 for r in retrieved.values())
    top = retrieved[zorvia]
    assert top["raw_score"] == pytest.approx(citations[0]["relevance"]) and top["datanet_id"] == "atlas"
    cited = sorted((r["rank"], r["contribution_id"]) for r in table(lake, "citations") if r["inference_id"] == answered.id)
    assert cited == [(i, c["contribution_id"]) for i, c in enumerate(citations)]
    assert {r["inference_id"] for r in table(lake, "inference_completed")} == answers, "no refused request was billed"
