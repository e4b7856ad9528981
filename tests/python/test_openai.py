"""End-to-end: `ledgerlake up` serves the shipped base model and PEFT adapters through the
official `openai` Python client, and every completion lands in the lake as an
`inference.completed` and a `fee.charged` event."""
import json
import os
import re
import time
import uuid

import numpy as np
import openai
import pytest
import requests
from deltalake import DeltaTable
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from conftest import ADMIN, BIN, keypair, run, signed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_DIR = os.environ.get("LEDGERLAKE_MODEL", os.path.join(ROOT, "models", "ledgerlake-base"))
BASE = "ledgerlake-base"


def write_peft_adapter(path, seed, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj")):
    """An adapter directory as PEFT's `save_pretrained` writes it (config + safetensors)."""
    cfg = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            block = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out, inp = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, inp)) * 0.3).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, r)) * 0.3).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": BASE, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": alpha,
              "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": r, "rank_pattern": {},
              "revision": None, "target_modules": list(targets), "task_type": "CAUSAL_LM", "use_dora": False,
              "use_rslora": False}
    json.dump(config, open(os.path.join(path, "adapter_config.json"), "w"))
    return path


def table_rows(lake, table):
    path = os.path.join(lake, table)
    if not os.path.exists(os.path.join(path, "_delta_log")):
        return []
    return DeltaTable(path).to_pyarrow_table().to_pylist()


def wait_rows(lake, table, n, timeout=60):
    deadline = time.time() + timeout
    rows = []
    while time.time() < deadline:
        rows = table_rows(lake, table)
        if len(rows) >= n:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{table} has {len(rows)} rows, expected {n}")


@pytest.fixture
def served(tmp_path, server_factory):
    lake = tmp_path / "lake"
    return server_factory(lake), str(lake)


def test_openai_client_completions_chat_streaming_and_accounting(served, tmp_path):
    server, lake = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    assert [m.id for m in client.models.list().data] == [BASE]

    # Non-streaming, greedy: deterministic, with usage.
    first = client.completions.create(model=BASE, prompt="It was a fine morning, and", max_tokens=12, temperature=0)
    again = client.completions.create(model=BASE, prompt="It was a fine morning, and", max_tokens=12, temperature=0)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text.strip(), "the model says something"
    assert first.choices[0].finish_reason in ("length", "stop")
    assert first.usage.completion_tokens <= 12 and first.usage.prompt_tokens > 1
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    # Streaming gives the same text in pieces, then the finish reason.
    chunks = list(client.completions.create(model=BASE, prompt="It was a fine morning, and", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
    assert chunks[-1].choices[0].finish_reason == first.choices[0].finish_reason

    # Seeded sampling repeats itself.
    sampled = [client.completions.create(model=BASE, prompt="The little rabbit", max_tokens=16, temperature=1.0,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]

    # Chat, plain and streamed with usage.
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Tell me a story."}],
                                          max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Tell me a story."}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage = [], None
    for c in stream:
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            pieces.append(ch.delta.content or "")
    assert "".join(pieces).strip() == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens

    # Every completion above is accounted for, once: 2 + 1 streamed + 2 sampled + 2 chat.
    done = 7
    inferences = wait_rows(lake, "inference_completed", done)
    fees = wait_rows(lake, "fee_charged", done)
    time.sleep(1)
    assert len(table_rows(lake, "inference_completed")) == done
    assert {r["inference_id"] for r in inferences} == {r["inference_id"] for r in fees}
    assert all(r["model_id"] == BASE for r in inferences)
    by_id = {r["inference_id"]: r for r in inferences}
    assert by_id[first.id]["completion_tokens"] == first.usage.completion_tokens
    assert by_id[first.id]["prompt_tokens"] == first.usage.prompt_tokens
    fee = {r["inference_id"]: r for r in fees}[first.id]
    # The base model's default prices: 10^15 per 1k prompt tokens, 2·10^15 per 1k completion tokens.
    expected = (first.usage.prompt_tokens * 10**15 + first.usage.completion_tokens * 2 * 10**15) // 1000
    assert int(fee["amount"]) == expected
    assert fee["payer"] == by_id[first.id]["caller"]

    # And its token ids, for attribution: as many as billed, decoding to the answer.
    tokens = {r["inference_id"]: r for r in wait_rows(lake, "inference_tokens", done)}
    assert set(tokens) == set(by_id)
    for inference_id, row in tokens.items():
        assert len(row["output_token_ids"]) == by_id[inference_id]["completion_tokens"]
        if by_id[inference_id]["prompt_tokens"]:
            assert len(row["prompt_token_ids"]) == by_id[inference_id]["prompt_tokens"]
    tokenizer = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    assert tokenizer.decode(tokens[first.id]["output_token_ids"]) == first.choices[0].text
    assert tokenizer.decode(tokens[first.id]["prompt_token_ids"]) == "It was a fine morning, and"

    metrics = requests.get(server.url + "/metrics").text
    assert "ledgerlake_serving_generated_tokens_total" in metrics
    assert "ledgerlake_serving_time_per_output_token_seconds_bucket" in metrics


def test_adapters_load_unload_and_errors(served, tmp_path):
    server, lake = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    path = write_peft_adapter(str(tmp_path / "style-a"), seed=1)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "style-a", "lora_path": path}, headers=admin)
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list().data}
    assert models["style-a"].model_extra["parent"] == BASE
    prompt = "It was a fine morning, and"
    base = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    adapted = client.completions.create(model="style-a", prompt=prompt, max_tokens=12, temperature=0)
    assert adapted.model == "style-a"
    assert adapted.choices[0].text != base, "the adapter changes the answer"
    # Loading the same name twice, a wrong path, and a non-admin key are refused.
    again = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "style-a", "lora_path": path}, headers=admin)
    assert again.status_code == 400 and again.json()["error"]["type"] == "invalid_request_error"
    missing = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": str(tmp_path / "none")}, headers=admin)
    assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
    reader = requests.post(server.url + "/v1/keys", json={"role": "read"}, headers=admin).json()["key"]
    forbidden = requests.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": path},
                              headers={"Authorization": f"Bearer {reader}"})
    assert forbidden.status_code == 403
    # A read key may call the models (and pays for it).
    as_reader = openai.OpenAI(base_url=server.url + "/v1", api_key=reader, max_retries=0)
    assert as_reader.completions.create(model="style-a", prompt=prompt, max_tokens=12, temperature=0).choices[0].text == adapted.choices[0].text

    # OpenAI's error shapes and statuses.
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", max_tokens=4, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=BASE, prompt="hi", max_tokens=4, n=17)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    bad_json = requests.post(server.url + "/v1/completions", data="{nope", headers=admin)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"

    # Unloaded: gone from the list, 404 afterwards.
    assert requests.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "style-a"}, headers=admin).status_code == 200
    assert "style-a" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="style-a", prompt="hi", max_tokens=4)
    assert requests.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "style-a"}, headers=admin).status_code == 404


def test_registered_models_are_served_and_priced(served, tmp_path):
    server, lake = served
    path = write_peft_adapter(str(tmp_path / "climate"), seed=3, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    builder = keypair()
    registration = {"kind": "model.registered", "event_id": "reg-climate-1", "model_id": "climate-lora",
                    "builder": builder["address"], "base_model": BASE, "adapter_uri": path, "datanets": [],
                    "price_per_1k_input": "6000000000000000", "price_per_1k_output": "54000000000000000"}
    # The base model's id is the deployment's: no builder registers it (and so sets its price).
    base = signed(server, builder["private_key"], {**registration, "event_id": "reg-base", "model_id": BASE})
    r = server.post(json.dumps(base))
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["model_id"], r.text
    assert server.post(json.dumps(signed(server, builder["private_key"], registration))).status_code == 200
    # Once registered, climate-lora is its builder's: a registration by another builder (with
    # other prices) is refused, whatever key sends it.
    other = keypair()
    taken = signed(server, other["private_key"], {**registration, "event_id": "reg-climate-other", "builder": other["address"],
                                                  "price_per_1k_output": "1"})
    r = server.post(json.dumps(taken))
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["model_id"], r.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    deadline = time.time() + 30
    while "climate-lora" not in [m.id for m in client.models.list().data]:
        assert time.time() < deadline, "the registered adapter never became servable"
        time.sleep(0.3)
    out = client.completions.create(model="climate-lora", prompt="The weather", max_tokens=8, temperature=0)
    fees = wait_rows(lake, "fee_charged", 1)
    fee = [f for f in fees if f["inference_id"] == out.id][0]
    assert fee["model_id"] == "climate-lora"
    assert int(fee["amount"]) == (out.usage.prompt_tokens * 6 * 10**15 + out.usage.completion_tokens * 54 * 10**15) // 1000


def test_spooled_events_survive_a_restart_and_count_once(tmp_path, server_factory):
    lake, state = tmp_path / "lake", tmp_path / "state"
    server = server_factory(lake, state_dir=state)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    out = client.completions.create(model=BASE, prompt="Once", max_tokens=4, temperature=0)
    inference = [r for r in wait_rows(lake, "inference_completed", 1) if r["inference_id"] == out.id][0]
    server.stop()
    # As if the process died after spooling: one completion already in the lake is spooled
    # again, and one never forwarded waits in the spool.
    spool = state / "spool"
    def events(inference_id, tokens):
        return [{"kind": "inference.completed", "event_id": f"{inference_id}:inference", "event_time": "2026-11-24T00:00:00Z",
                 "inference_id": inference_id, "model_id": BASE, "caller": inference["caller"], "prompt_tokens": 2,
                 "completion_tokens": tokens, "output_sha256": "0" * 64, "latency_ms": 5},
                {"kind": "fee.charged", "event_id": f"{inference_id}:fee", "event_time": "2026-11-24T00:00:00Z",
                 "inference_id": inference_id, "model_id": BASE, "payer": inference["caller"], "amount": "10"}]
    (spool / f"{out.id}.json").write_text(json.dumps(events(out.id, 4)))
    pending = f"cmpl-{uuid.uuid4().hex}"
    (spool / f"{pending}.json").write_text(json.dumps(events(pending, 3)))
    server = server_factory(lake, state_dir=state)
    rows = wait_rows(lake, "inference_completed", 2)
    deadline = time.time() + 30
    while list(spool.glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    assert not list(spool.glob("*.json")), "the spool drains"
    rows = table_rows(lake, "inference_completed")
    assert sorted(r["inference_id"] for r in rows) == sorted([out.id, pending])
    assert len(table_rows(lake, "fee_charged")) == 2


def test_a_stream_cut_mid_way_is_cancelled_and_charged_for_what_was_generated(served):
    server, lake = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    prompt, limit = "It was a fine morning, and", 400
    # Greedy on the shipped model, this prompt runs to the token limit (no early end of
    # text), so a shorter recorded completion can only come from the cancellation.
    full = client.completions.create(model=BASE, prompt=prompt, max_tokens=limit, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == limit

    body = {"model": BASE, "prompt": prompt, "max_tokens": limit, "temperature": 0, "stream": True}
    resp = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200
    chunks = []
    for line in resp.iter_lines():
        if line.startswith(b"data: {"):
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 3:
                break
    resp.close()  # the caller hangs up mid-stream
    stream_id = chunks[0]["id"]

    deadline = time.time() + 60
    row = None
    while row is None and time.time() < deadline:
        row = next((r for r in table_rows(lake, "inference_completed") if r["inference_id"] == stream_id), None)
        time.sleep(0.2)
    assert row is not None, "the cancelled stream is accounted for"
    assert 3 <= row["completion_tokens"] < limit
    fee_row = [f for f in wait_rows(lake, "fee_charged", 2) if f["inference_id"] == stream_id][0]
    # Priced by the defaults: 10^15 per 1k prompt tokens, 2·10^15 per 1k completion tokens.
    expected = (row["prompt_tokens"] * 10**15 + row["completion_tokens"] * 2 * 10**15) // 1000
    assert int(fee_row["amount"]) == expected
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'ledgerlake_serving_requests_total{finish_reason="cancelled"} 1' in metrics


def test_a_corrupt_spool_file_is_quarantined_counted_and_listed(tmp_path, server_factory):
    from conftest import BIN
    import subprocess
    lake, state = tmp_path / "lake", tmp_path / "state"
    spool = state / "spool"
    spool.mkdir(parents=True)
    (spool / "cmpl-torn.json").write_text('[{"kind": "fee.charged", "event_id": "cmpl-torn:fee", "amou')
    server = server_factory(lake, state_dir=state)
    deadline = time.time() + 30
    while not (spool / "quarantine" / "cmpl-torn.json").exists():
        assert time.time() < deadline, "the torn file is quarantined"
        time.sleep(0.2)
    assert (spool / "quarantine" / "cmpl-torn.json").read_text().endswith('"amou'), "kept byte for byte"
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    # Under its documented name, not nested in another component's prefix.
    assert re.search(r"^ledgerlake_spool_quarantined_total 1$", metrics, re.M), metrics
    listed = subprocess.run([BIN, "spool", "list", "--data", str(lake), "--state-dir", str(state)], capture_output=True, text=True)
    assert listed.returncode == 0 and "cmpl-torn.json\tunreadable" in listed.stdout, listed
    redrive = subprocess.run([BIN, "spool", "redrive", "cmpl-torn.json", "--data", str(lake), "--state-dir", str(state)],
                             capture_output=True, text=True)
    assert redrive.returncode != 0 and "still cannot be read" in redrive.stderr, redrive
    # Served completions still bill normally meanwhile.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    out = client.completions.create(model=BASE, prompt="Once", max_tokens=3, temperature=0)
    assert out.id in {r["inference_id"] for r in wait_rows(str(lake), "inference_completed", 1)}


def test_logprobs_n_and_penalties_through_the_openai_client(served):
    server, lake = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    prompt = "It was a fine morning, and"

    # Completions: each token's log-probability and its 3 most likely alternatives; the
    # greedy token is the most likely one, and the tokens spell the text.
    c = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)
        assert token in top
    # Sampled tokens have log-probabilities too, and echo offsets start after the prompt.
    echoed = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=1.0, seed=3, logprobs=0, echo=True)
    assert echoed.choices[0].logprobs.text_offset[0] == len(prompt)
    assert all(t == {} for t in echoed.choices[0].logprobs.top_logprobs)

    # Chat: logprobs with top_logprobs, in the chat shape.
    chat = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    streamed = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                              temperature=0, logprobs=True, stream=True)
    tokens = [t.token for ch in streamed for choice in ch.choices if choice.logprobs for t in choice.logprobs.content]
    assert tokens == [t.token for t in content]

    # n: three seeded choices, different draws, the prompt billed once.
    many = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=1.0, seed=11, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert len({ch.text for ch in many.choices}) > 1
    alone = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=1.0, seed=11)
    assert alone.choices[0].text == many.choices[0].text, "choice 0 draws with the request's seed"
    assert many.usage.prompt_tokens == alone.usage.prompt_tokens
    # Streamed, every index arrives and the usage chunk covers all choices.
    chunks = list(client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                                 temperature=1.0, seed=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason) == 2
    usage = [c.usage for c in chunks if c.usage][-1]
    assert usage.completion_tokens <= 10 and usage.prompt_tokens > 0

    # Penalties: a strong frequency penalty stops the greedy text repeating a token.
    plain = client.completions.create(model=BASE, prompt="the the the the", max_tokens=24, temperature=0, logprobs=0)
    penalized = client.completions.create(model=BASE, prompt="the the the the", max_tokens=24, temperature=0, logprobs=0,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"repetition_penalty": 1.5})
    def most_repeated(choice):
        toks = choice.logprobs.tokens
        return max(toks.count(t) for t in toks)
    assert most_repeated(penalized.choices[0]) < most_repeated(plain.choices[0])

    # Out-of-range values are refused naming the field, and nothing is charged for them.
    for kwargs, param in [({"n": 0}, "n"), ({"n": 17}, "n"), ({"logprobs": 21}, "logprobs"),
                          ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                          ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=BASE, prompt=prompt, max_tokens=2, **kwargs)
        assert e.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"

    # Accounting: every choice is an inference; extra choices carry no prompt tokens.
    requests_made = 1 + 1 + 1 + 1 + 3 + 1 + 2 + 2
    rows = wait_rows(lake, "inference_completed", requests_made)
    by_id = {r["inference_id"]: r for r in rows}
    assert by_id[many.id]["prompt_tokens"] == many.usage.prompt_tokens
    assert by_id[many.id + "-1"]["prompt_tokens"] == 0 and by_id[many.id + "-2"]["prompt_tokens"] == 0
    assert sum(by_id[i]["completion_tokens"] for i in (many.id, many.id + "-1", many.id + "-2")) == many.usage.completion_tokens


def test_token_ids_expire_by_day_and_a_deployment_can_keep_none(tmp_path, server_factory):
    lake = tmp_path / "lake"
    server = server_factory(lake)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    out = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert [r["inference_id"] for r in wait_rows(str(lake), "inference_tokens", 1)] == [out.id]
    # Days before today are expired: today's row stays; before tomorrow, it goes.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert "removed 0 files" in run("maintenance", "expire", "--before", today, "--data", str(lake))
    assert len(table_rows(str(lake), "inference_tokens")) == 1
    assert "removed 1 files" in run("maintenance", "expire", "--before", tomorrow, "--data", str(lake))
    assert table_rows(str(lake), "inference_tokens") == []
    # Only the token ids go: the inference and its fee stay, and time travel still reads them.
    assert len(table_rows(str(lake), "inference_completed")) == 1
    assert len(DeltaTable(os.path.join(lake, "inference_tokens"), version=1).to_pyarrow_table()) == 1
    with pytest.raises(AssertionError, match="append-only|retention"):
        run("maintenance", "expire", "--data", str(lake), env={"LEDGERLAKE_TOKEN_RETENTION_DAYS": "0"})
    server.stop()

    # With record_tokens off, answers are billed but their token ids are not stored.
    lake2 = tmp_path / "lake2"
    server = server_factory(lake2, env={"LEDGERLAKE_RECORD_TOKENS": "false"})
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    out = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert [r["inference_id"] for r in wait_rows(str(lake2), "inference_completed", 1)] == [out.id]
    # The spool file goes only once all of its events are durable.
    spool = lake2 / "_ledgerlake" / "spool"
    deadline = time.time() + 60
    while list(spool.glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    assert not list(spool.glob("*.json"))
    assert table_rows(str(lake2), "inference_tokens") == []
