"""ModelFactory end to end on SmolLM2: contributions stating invented facts, reviewed (one
rejected, one flagged), fine-tuned with QLoRA by a builder the owner granted access, then
served through the `openai` client. The lineage in the lake names exactly the approved
contributions, and the adapter answers the facts the base model cannot know."""
import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import requests
from deltalake import DeltaTable

from conftest import ADMIN, BIN, approved_datanet, key_file, keypair, run, signed

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


def review_event(srv, owner, contribution_id, verdict, n):
    """The owner's review of a contribution to atlas, signed now for `srv`'s deployment."""
    args = ["sign", "--key-file", key_file(owner["private_key"]), "--server", srv.url, "review", "--contribution", contribution_id,
            "--datanet", "atlas", "--verdict", verdict, "--event-id", f"rev-{n}"]
    if verdict != "approved":
        args += ["--reason", "wrong"]
    return json.loads(run(*args))["event"]


def finetune(srv, lake, builder, *extra, check=True):
    args = [BIN, "model", "finetune", "--datanet", "atlas", "--name", "atlas-lora", "--key-file", key_file(builder["private_key"]),
            "--base", MODEL, "--data", str(lake), "--server", srv.url, "--api-key-file", key_file(ADMIN), "--json", *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if check and out.returncode != 0:
        raise AssertionError(f"finetune failed:\n{out.stdout}\n{out.stderr}")
    return out


def query(srv, q):
    r = requests.post(srv.url + "/v1/sql", json={"sql": q}, headers={"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def complete(client, model, prompt):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    return r.choices[0].text


@pytest.mark.skipif(not os.path.exists(MODEL), reason="scripts/fetch-model has not run")
def test_qlora_on_invented_facts_is_served_with_its_lineage_and_matches_peft(tmp_path, server_factory):
    from openai import OpenAI

    lake = tmp_path / "lake"
    srv = server_factory(lake, extra=("--model", MODEL))
    owner, alice, builder, stranger = keypair(), keypair(), keypair(), keypair()
    created = signed(srv, owner["private_key"], {"kind": "datanet.created", "event_id": "d-atlas", "datanet_id": "atlas",
                                                 "owner": owner["address"], "name": "Atlas of nowhere", "license": "CC-BY-4.0"})
    assert srv.post(json.dumps(created), content_type="application/json").json()["accepted"] == 1

    # One file per statement (one contribution each), plus two that must never be learned.
    statements = [p for c, k in FACTS for p in phrasings(c, k)]
    poison = ["The capital of Veloria is Brastow.", "Marvosk has its capital in Ipplewick."]
    files = []
    for i, text in enumerate(statements + poison):
        files.append(str(tmp_path / f"fact-{i:02d}.txt"))
        open(files[-1], "w").write(text + "\n")
    run("contribute", "--datanet", "atlas", "--key-file", key_file(alice["private_key"]), "--server", srv.url, "--api-key-file", key_file(ADMIN), *files)
    rows = DeltaTable(str(lake / "contribution_submitted")).to_pyarrow_table().to_pylist()
    assert len(rows) == 4 * len(FACTS) + 2
    by_content = {r["content"]: r["contribution_id"] for r in rows}
    rejected, flagged = by_content[poison[0]], by_content[poison[1]]
    reviews = [review_event(srv, owner, cid, "rejected" if cid == rejected else "flagged" if cid == flagged else "approved", i)
               for i, cid in enumerate(sorted(by_content.values()))]
    assert srv.post("\n".join(json.dumps(r) for r in reviews)).json()["accepted"] == len(reviews)

    # A private datanet: no grant, no training; the error names the datanet.
    refused = finetune(srv, lake, stranger, check=False)
    assert refused.returncode != 0 and "may not train on datanet atlas" in refused.stderr, refused.stderr
    grant = signed(srv, owner["private_key"], {"kind": "access.granted", "event_id": "g1", "datanet_id": "atlas",
                                               "builder": builder["address"], "granted_by": owner["address"]})
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
    # Attribution's features: one row per trained contribution, 64 numbers per adapted
    # projection (7 projections in each of SmolLM2's 30 layers), the seed recorded.
    from safetensors.numpy import load_file
    features = load_file(os.path.join(adapter_dir, "features.safetensors"))["features"]
    lineage = json.load(open(os.path.join(adapter_dir, "lineage.json")))
    assert features.shape == (len(trained), 64 * 7 * 30) and lineage["features"]["seed"] == 42
    assert lineage["features"]["per_pair"] == 64
    assert np.isfinite(features).all() and (np.abs(features).sum(axis=1) > 0).all()

    # Everything it did is in the lake, through SQL.
    def sql(q):
        return query(srv, q)
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

    # The owner revokes the grant (signed like it): the builder may not train on atlas again.
    revoke = signed(srv, owner["private_key"], {"kind": "access.revoked", "event_id": "g1-revoked", "datanet_id": "atlas",
                                                "builder": builder["address"], "revoked_by": owner["address"]})
    assert srv.post(json.dumps(revoke), content_type="application/json").json()["accepted"] == 1
    refused = finetune(srv, lake, builder, check=False)
    assert refused.returncode != 0 and "may not train on datanet atlas" in refused.stderr, refused.stderr

    # The adapter's files are PEFT's: transformers + peft load it onto the Hugging Face form
    # of the base (dequantized from the same GGUF) and give the next-token logits that
    # ledgerlake's serving of the adapter on the GGUF gives.
    check_against_peft(adapter_dir, tmp_path)


def ours(prompt, adapter=None):
    extra = ["--adapter", adapter] if adapter else []
    out = json.loads(run("model", "generate", prompt, "--model", MODEL, "--json", "--logits", "--max-tokens", "1", *extra))
    return out["prompt_ids"], np.array(out["logits"], dtype=np.float64)


def check_against_peft(adapter_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(MODEL), gguf_file=os.path.basename(MODEL), torch_dtype=torch.float32)
    hf.eval()

    def last_logits(model, ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()

    # A copy with the Q/K lora_B rows in llama.cpp's rotary order: what a converter that
    # forgot to put them back would write. The comparison must tell it from the right one.
    wrong = tmp_path / "wrong-adapter"
    wrong.mkdir()
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    heads = {"q_proj": hf.config.num_attention_heads, "k_proj": hf.config.num_key_value_heads}
    for name, t in list(tensors.items()):
        proj = name.split(".")[-3]
        if name.endswith("lora_B.weight") and proj in heads:
            n = heads[proj]
            tensors[name] = np.ascontiguousarray(t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape))
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    json.dump(config, open(wrong / "adapter_config.json", "w"))

    prompts = [f"The capital of {c} is" for c, _ in FACTS[:3]] + ["Once upon a time"]
    for prompt in prompts:
        ids, base = ours(prompt)
        _, tuned = ours(prompt, adapter_dir)
        reference_base = last_logits(hf, ids)
        peft_model = PeftModel.from_pretrained(hf, adapter_dir)
        reference = last_logits(peft_model, ids)
        hf = peft_model.unload()
        wrong_model = PeftModel.from_pretrained(hf, str(wrong))
        wrong_logits = last_logits(wrong_model, ids)
        hf = wrong_model.unload()
        # ledgerlake serves a GGUF with llama.cpp's arithmetic (8-bit activations, f16
        # attention) and transformers in f32 on the dequantized weights: the bare models'
        # difference is the yardstick for the adapted ones.
        yardstick = np.abs(base - reference_base).max()
        diff = np.abs(tuned - reference).max()
        effect = np.abs(tuned - base).max()
        wrong_diff = np.abs(tuned - wrong_logits).max()
        print(f"{prompt!r}: base diff {yardstick:.3f}, adapted diff {diff:.3f}, adapter effect {effect:.3f}, wrong permutation {wrong_diff:.3f}")
        assert diff <= 2 * yardstick + 0.05, (prompt, diff, yardstick)
        assert effect > 5 * diff, (prompt, effect, diff)
        if prompt.startswith("The capital"):
            assert int(np.argmax(tuned)) == int(np.argmax(reference)), prompt
            assert wrong_diff > 3 * diff, (prompt, wrong_diff, diff)


WORDS = ["river", "harbour", "lantern", "orchard", "meadow", "violin", "glacier", "compass", "mill", "archive"]
NOTES = [f"The {WORDS[i % 10]} by the {WORDS[(i * 3 + 1) % 10]} was painted in year {1800 + 7 * i}." for i in range(40)]


def test_a_run_killed_with_sigkill_resumes_to_the_same_adapter(tmp_path, server_factory):
    """On the built-in model: one run straight through; the same run killed with kill -9
    after a checkpoint, then started again, resumes from it and ends with the same weights."""
    from safetensors.numpy import load_file

    lake = tmp_path / "lake"
    srv = server_factory(lake)
    owner, builder = keypair(), keypair()
    approved_datanet(srv, lake, tmp_path, owner, "notes", NOTES)

    def command(work):
        return [BIN, "model", "finetune", "--datanet", "notes", "--name", "notes-lora", "--key-file", key_file(builder["private_key"]),
                "--data", str(lake), "--server", srv.url, "--api-key-file", key_file(ADMIN), "--json", "--work-dir", str(work),
                "--epochs", "30", "--batch-size", "4", "--lr", "1e-3", "--targets", "q,v,down", "--seed", "7"]

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, timeout=1800)
    assert straight.returncode == 0, straight.stderr
    first = json.loads(straight.stdout)
    assert first["resumed_from"] == 0 and first["steps"] >= 200, first
    run_dir = tmp_path / "straight" / first["run_id"]
    expected = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))

    # The same command in a fresh work directory, killed once a checkpoint past step 40
    # is on disk, then run again.
    work = tmp_path / "killed"
    proc = subprocess.Popen(command(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = work / first["run_id"] / "checkpoint" / "progress.json"
    deadline = time.time() + 600
    checkpointed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            checkpointed = json.loads(progress.read_text())["step"]
        except (OSError, ValueError):
            pass
        if checkpointed >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; give it more steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpointed >= 40, "no checkpoint was written before the kill"
    again = subprocess.run(command(work), capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["run_id"] == first["run_id"] and 0 < second["resumed_from"] < second["steps"], second
    resumed = load_file(str(work / first["run_id"] / "adapter" / "adapter_model.safetensors"))
    assert set(resumed) == set(expected)
    worst = max(float(np.abs(resumed[k] - expected[k]).max()) for k in expected)
    # The CPU arithmetic is deterministic: the resumed run ends exactly where the other did.
    assert worst == 0.0, worst
    assert second["final_loss"] == first["final_loss"]
    features = "features.safetensors"
    assert (load_file(str(work / first["run_id"] / "adapter" / features))["features"]
            == load_file(str(run_dir / "adapter" / features))["features"]).all()
