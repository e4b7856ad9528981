"""The training API on the built-in model: builder keys bound to an address, refusals that
change nothing, a FIFO queue of one running job, cancelling, progress as server-sent
events, a job that survives `ledgerlake up` being killed (it resumes from its checkpoint),
and the finished adapters registered, served and queryable with SQL."""
import json
import time

import requests

from conftest import ADMIN, approved_datanet, keypair

WORDS = ["ember", "quartz", "willow", "falcon", "harbor", "saffron", "granite", "lagoon", "thistle", "cobalt"]
NOTES = [f"The {WORDS[i % 10]} lantern of {WORDS[(i * 7 + 3) % 10]} street was lit in {1700 + 11 * i}." for i in range(40)]


def api(srv, method, path, key, **kw):
    return requests.request(method, srv.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def make_key(srv, role, address=None):
    r = api(srv, "POST", "/v1/keys", ADMIN, json={"role": role, "address": address})
    assert r.status_code == 201, r.text
    return r.json()


def sse(srv, job_id, key):
    """The job's server-sent events as (event, data) pairs, until the stream ends."""
    with requests.get(f"{srv.url}/v1/training/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"},
                      stream=True, timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        event, data = None, []
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and event:
                yield event, json.loads("\n".join(data))
                event, data = None, []


def wait_for(srv, job_id, key, statuses, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = api(srv, "GET", f"/v1/training/jobs/{job_id}", key).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_training_jobs_queue_stream_survive_a_kill_and_are_served(tmp_path, server_factory):
    from openai import OpenAI

    lake, state = tmp_path / "lake", tmp_path / "state"
    srv = server_factory(lake, state_dir=state)
    owner, builder, other = keypair(), keypair(), keypair()
    approved_datanet(srv, lake, tmp_path, owner, "notes", NOTES)
    approved_datanet(srv, lake, tmp_path, owner, "secret", ["A private note nobody granted."], visibility="private")

    made = make_key(srv, "builder", builder["address"])
    assert made["role"] == "builder" and made["address"] == builder["address"]
    key = made["key"]
    reader = make_key(srv, "read")["key"]
    for bad in [{"role": "builder"}, {"role": "service", "address": builder["address"]}, {"role": "builder", "address": "0x12"}]:
        r = api(srv, "POST", "/v1/keys", ADMIN, json=bad)
        assert r.status_code == 400, (bad, r.text)

    spec = {"datanets": ["notes"], "name": "lamps-a", "epochs": 40, "batch_size": 4, "learning_rate": 1e-3,
            "targets": ["q", "v"], "seed": 3}
    # Refusals say why and queue nothing.
    for who, body, status, words in [
        (None, spec, 401, "API key"),
        (reader, spec, 403, "builder or admin"),
        (key, {**spec, "builder": other["address"]}, 403, builder["address"]),
        (key, {**spec, "datanets": ["secret"], "name": "nope"}, 403, "datanet secret"),
        (key, {**spec, "datanets": ["nowhere"]}, 404, "nowhere"),
        (key, {**spec, "ranks": 3}, 400, "ranks"),
        (key, {**spec, "rank": 0}, 400, "rank"),
        (key, {**spec, "qlora": True}, 400, "dense"),
        (ADMIN, spec, 400, "builder"),
    ]:
        headers = {"Authorization": f"Bearer {who}"} if who else {}
        r = requests.post(srv.url + "/v1/training/jobs", json=body, headers=headers, timeout=60)
        assert r.status_code == status and words in r.json()["error"]["message"], (body, r.status_code, r.text)
    assert api(srv, "GET", "/v1/training/jobs", ADMIN).json()["data"] == []

    # Three jobs: one runs, two queue behind it in order; the third is cancelled while queued.
    r = api(srv, "POST", "/v1/training/jobs", key, json=spec)
    assert r.status_code == 202, r.text
    a = r.json()
    assert r.headers["location"] == f"/v1/training/jobs/{a['id']}"
    assert a["builder"] == builder["address"] and a["spec"]["datanets"][0].startswith("notes@"), a
    again = api(srv, "POST", "/v1/training/jobs", key, json=spec)
    assert again.status_code == 200 and again.json()["id"] == a["id"], "the same request is the same job"
    b = api(srv, "POST", "/v1/training/jobs", ADMIN, json={**spec, "name": "lamps-b", "epochs": 2, "builder": builder["address"]}).json()
    c = api(srv, "POST", "/v1/training/jobs", key, json={**spec, "name": "lamps-c", "epochs": 2}).json()
    assert b["status"] == c["status"] == "queued" and a["seq"] < b["seq"] < c["seq"]
    # Another builder sees none of them.
    stranger = make_key(srv, "builder", other["address"])["key"]
    assert api(srv, "GET", "/v1/training/jobs", stranger).json()["data"] == []
    assert api(srv, "GET", f"/v1/training/jobs/{a['id']}", stranger).status_code == 404
    assert api(srv, "DELETE", f"/v1/training/jobs/{c['id']}", stranger).status_code == 404
    cancelled = api(srv, "DELETE", f"/v1/training/jobs/{c['id']}", key)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert api(srv, "DELETE", f"/v1/training/jobs/{c['id']}", key).status_code == 409

    # Progress arrives as server-sent events; the server is killed once a checkpoint is on disk.
    progress = state / "training" / a["id"] / "checkpoint" / "progress.json"
    seen = []
    for event, data in sse(srv, a["id"], key):
        seen.append(event)
        if event == "progress":
            assert data["run_id"] == a["id"] and data["steps"] >= 300 and data["loss"] > 0, data
            if progress.exists() and json.loads(progress.read_text())["step"] >= 30:
                break
    assert seen[0] == "status" and "progress" in seen
    assert api(srv, "GET", f"/v1/training/jobs/{a['id']}", key).json()["status"] == "running"
    srv.kill()
    checkpointed = json.loads(progress.read_text())["step"]

    # Restarted on the same state, the job runs again from its checkpoint, then the next one.
    srv = server_factory(lake, state_dir=state)
    events = list(sse(srv, a["id"], key))
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded", events[-1]
    steps = [d["step"] for e, d in events if e == "progress"]
    # The stream shows live steps only: the resumed run may pass a few before it connects.
    # Where it resumed is `resumed_from`, checked below.
    assert steps and steps[0] > checkpointed and steps == list(range(steps[0], steps[-1] + 1)), (steps[:3], checkpointed)
    done = api(srv, "GET", f"/v1/training/jobs/{a['id']}", key).json()
    assert done["resumed_from"] == checkpointed and done["metrics"][-1]["step"] == done["metrics"][-1]["steps"]
    ev = done["evaluation"]
    assert ev["heldout_examples"] >= 1 and ev["loss"] < ev["base_loss"], ev
    assert done["adapter_uri"].endswith(f"/lamps-a/{a['id']}/")
    b_done = wait_for(srv, b["id"], key, ["succeeded", "failed"])
    assert b_done["status"] == "succeeded" and b_done["started_at"] >= done["finished_at"], b_done
    assert api(srv, "DELETE", f"/v1/training/jobs/{a['id']}", key).status_code == 409

    # The lake has both runs and their registrations, queryable with SQL; c never ran.
    def sql(q):
        r = requests.post(srv.url + "/v1/sql", json={"sql": q}, headers={"Authorization": f"Bearer {key}", "Accept": "application/json"})
        assert r.status_code == 200, r.text
        return r.json()
    deadline = time.time() + 30
    while len(sql("SELECT run_id FROM training_runs")) < 2 and time.time() < deadline:
        time.sleep(0.5)
    runs = sql("SELECT run_id, model_id, status, builder FROM training_runs ORDER BY model_id")
    assert runs == [{"run_id": a["id"], "model_id": "lamps-a", "status": "completed", "builder": builder["address"]},
                    {"run_id": b["id"], "model_id": "lamps-b", "status": "completed", "builder": builder["address"]}], runs
    reg = sql("SELECT model_id, training_run_id FROM model_registered ORDER BY model_id")
    assert [r["training_run_id"] for r in reg] == [a["id"], b["id"]]
    metrics = sql(f"SELECT count(*) AS n FROM training_metrics WHERE run_id = '{a['id']}'")
    assert metrics == [{"n": done["metrics"][-1]["steps"]}], "every step is recorded once, across the kill"

    # Served by its model id, through the openai client.
    client = OpenAI(base_url=srv.url + "/v1", api_key=key)
    deadline = time.time() + 60
    while "lamps-a" not in [m.id for m in client.models.list().data]:
        assert time.time() < deadline, "the adapter was never served"
        time.sleep(0.5)
    out = client.completions.create(model="lamps-a", prompt="The ember lantern", max_tokens=8, temperature=0)
    assert out.model == "lamps-a" and out.usage.completion_tokens > 0

    # A cancelled job submitted again is queued again.
    r = api(srv, "POST", "/v1/training/jobs", key, json={**spec, "name": "lamps-c", "epochs": 2})
    assert r.status_code == 202 and r.json()["id"] == c["id"] and r.json()["status"] == "queued", r.text
    assert wait_for(srv, c["id"], key, ["succeeded", "failed"])["status"] == "succeeded"

    # A running job cancelled: 202 at once, then it stops at its next step and its
    # training.run says so in the lake.
    d = api(srv, "POST", "/v1/training/jobs", key, json={**spec, "name": "lamps-d", "seed": 5}).json()
    for event, data in sse(srv, d["id"], key):
        if event == "progress":
            break
    r = api(srv, "DELETE", f"/v1/training/jobs/{d['id']}", key)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text
    stopped = wait_for(srv, d["id"], key, ["cancelled", "succeeded", "failed"])
    assert stopped["status"] == "cancelled" and stopped["metrics"][-1]["step"] < stopped["metrics"][-1]["steps"], stopped["status"]
    deadline = time.time() + 30
    while not sql(f"SELECT status FROM training_runs WHERE run_id = '{d['id']}'") and time.time() < deadline:
        time.sleep(0.5)
    assert sql(f"SELECT status FROM training_runs WHERE run_id = '{d['id']}'") == [{"status": "cancelled"}]
