"""SmolLM2-135M-Instruct from its 4-bit GGUF (`scripts/fetch-model`), served by ledgerlake and
checked against llama.cpp itself (`llama-cpp-python`, which builds llama.cpp from source):
the same token ids, the same first-step logits, the same greedy text, the same answer to a
chat question through the official `openai` client, and the same effect of a LoRA adapter
given to each in its own format (PEFT's Hugging Face layout to ledgerlake, llama.cpp's
GGUF LoRA to llama.cpp)."""
import json
import os
import subprocess

import gguf
import llama_cpp
import numpy as np
import openai
import pytest
import requests
from safetensors.numpy import save_file

from conftest import ADMIN, BIN
from test_openai import wait_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
NAME = "smollm2-135m-instruct.q4_1"
# SmolLM2-135M: 30 layers, hidden 576, 9 heads and 3 KV heads of 64, MLP 1536.
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 30, 576, 9, 3, 64, 1536
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n    ",
    "In 2024, the 3 largest cities were",
    "Photosynthesis is the process by which",
    "Liste des ingrédients pour une crêpe :",
    "  Multiple   spaces\tand\nnew lines!!",
    "The quick brown fox jumps over the lazy dog. Then the dog",
    "Q: What is 12 + 30?\nA:",
    "Water boils at",
]
NEW_TOKENS = 32

pytestmark = pytest.mark.skipif(not os.path.exists(MODEL), reason="run scripts/fetch-model first (scripts/test does)")


def ours(*prompts, extra=()):
    out = subprocess.run([BIN, "model", "generate", "--model", MODEL, "--max-tokens", str(NEW_TOKENS), "--json", "--logits",
                          *extra, *prompts], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def reference(model, prompt_ids):
    """llama.cpp's first-step logits and greedy continuation (stopping at end of generation)."""
    model.reset()
    model.eval(prompt_ids)
    logits = np.array(model.scores[model.n_tokens - 1])
    model.reset()
    ids = []
    for t in model.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(model._model.vocab, t) or len(ids) >= NEW_TOKENS:
            break
        ids.append(t)
    return logits, ids


@pytest.fixture(scope="module")
def llama():
    return llama_cpp.Llama(model_path=MODEL, n_threads=2, n_ctx=512, logits_all=True, verbose=False)


def test_tokens_logits_and_greedy_text_match_llama_cpp(llama):
    mine = ours(*PROMPTS)
    same_text, report = 0, []
    for prompt, got in zip(PROMPTS, mine):
        ids = llama.tokenize(prompt.encode(), add_bos=True, special=True)
        assert got["prompt_ids"] == ids, f"tokenizer differs on {prompt!r}"
        logits, greedy = reference(llama, ids)
        diff = np.abs(np.array(got["logits"]) - logits)
        # ledgerlake reproduces llama.cpp's CPU arithmetic for GGUF models (activation
        # quantization, f16 KV cache, summation orders, ggml's exp), so the logits agree to
        # float rounding; 1e-3 on logits spanning ~35 leaves room for a different libm or a
        # compiler's fused multiply-adds, and is 100x below the ~0.1 that any deviation
        # in arithmetic (an f32 KV cache, say) causes.
        assert diff.max() <= 1e-3, f"{prompt!r}: logits differ by up to {diff.max()}"
        if got["ids"] == greedy:
            same_text += 1
        else:
            first = next(i for i, (a, b) in enumerate(zip(got["ids"] + [-1], greedy + [-1])) if a != b)
            report.append(f"{prompt!r} first differs at token {first}")
    assert same_text >= 9, report


def test_chat_template_renders_as_jinja2_and_answers_as_llama_cpp(llama):
    question = "Which city is the capital of France?"
    [got] = ours(question, extra=["--chat"])
    template = llama.metadata["tokenizer.chat_template"]
    formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    expected = formatter(messages=[{"role": "user", "content": question}]).prompt
    assert got["prompt_text"] == expected
    answer = llama.create_chat_completion(messages=[{"role": "user", "content": question}], max_tokens=NEW_TOKENS,
                                          temperature=0.0, top_k=1, repeat_penalty=1.0)["choices"][0]["message"]["content"]
    assert got["text"] == answer
    assert "Paris" in answer


def write_peft_adapter(path, seed, scale=0.02, r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """A PEFT adapter for SmolLM2 in the Hugging Face layout (what PEFT trains and saves)."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"q_proj": (q, HIDDEN), "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, q),
              "gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for t in targets:
            block = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out, inp = shapes[t]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, inp)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, r)) * scale * 10).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "peft_type": "LORA", "r": r,
              "lora_alpha": alpha, "target_modules": list(targets), "task_type": "CAUSAL_LM", "use_rslora": False,
              "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0}
    json.dump(config, open(os.path.join(path, "adapter_config.json"), "w"))
    return tensors


def llama_cpp_permute(w, heads):
    """`permute` of llama.cpp's convert_hf_to_gguf.py: Hugging Face's rotary row order to GGUF's."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_lora(path, tensors, alpha=16, permute=True):
    """The same adapter as llama.cpp's convert_lora_to_gguf.py writes it."""
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for name, t in sorted(tensors.items()):
        parts = name.split(".")
        layer, proj, half = int(parts[4]), parts[6], parts[7]
        if half == "lora_B" and permute and proj in ("q_proj", "k_proj"):
            t = llama_cpp_permute(t, HEADS if proj == "q_proj" else KV_HEADS)
        suffix = "lora_a" if half == "lora_A" else "lora_b"
        writer.add_tensor(f"blk.{layer}.{gguf_names[proj]}.weight.{suffix}", np.ascontiguousarray(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_peft_adapter_acts_as_the_same_lora_in_llama_cpp(tmp_path):
    """The adapter in PEFT's layout, served by ledgerlake, against the same adapter converted
    for llama.cpp (its Q and K `lora_B` rows permuted as llama.cpp's converter does). The
    LoRA products are summed in another order than llama.cpp's, which this chaotic model
    amplifies to ~0.1-0.2 mean logit differences; leaving the rows in the Hugging Face
    order instead (the bug this guards against) gives 5-7 times that."""
    tensors = write_peft_adapter(tmp_path / "peft", seed=1)
    write_gguf_lora(str(tmp_path / "lora.gguf"), tensors)
    write_gguf_lora(str(tmp_path / "unpermuted.gguf"), tensors, permute=False)
    prompts = PROMPTS[:3]
    with_adapter = ours(*prompts, extra=["--adapter", str(tmp_path / "peft")])
    without = ours(*prompts)
    right = llama_cpp.Llama(model_path=MODEL, n_threads=2, n_ctx=512, logits_all=True, verbose=False,
                            lora_path=str(tmp_path / "lora.gguf"))
    wrong = llama_cpp.Llama(model_path=MODEL, n_threads=2, n_ctx=512, logits_all=True, verbose=False,
                            lora_path=str(tmp_path / "unpermuted.gguf"))
    for got, base in zip(with_adapter, without):
        mine = np.array(got["logits"])
        effect = np.abs(mine - np.array(base["logits"])).mean()
        near = np.abs(mine - reference(right, got["prompt_ids"])[0]).mean()
        far = np.abs(mine - reference(wrong, got["prompt_ids"])[0]).mean()
        assert effect > 0.5, "the adapter changes the logits"
        assert near < 0.3 and far > 2 * near, (near, far)


def test_served_smollm_answers_with_adapters_and_metering(tmp_path, server_factory, llama):
    lake = tmp_path / "lake"
    server = server_factory(lake, extra=["--model", MODEL])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]

    question = [{"role": "user", "content": "Which city is the capital of France?"}]
    chat = client.chat.completions.create(model=NAME, messages=question, max_tokens=NEW_TOKENS, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer
    assert chat.choices[0].finish_reason == "stop", "the turn ends at <|im_end|>"
    expected = llama.create_chat_completion(messages=question, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1,
                                            repeat_penalty=1.0)
    assert answer == expected["choices"][0]["message"]["content"]
    assert chat.usage.prompt_tokens == expected["usage"]["prompt_tokens"]

    # A conversation with a system turn renders through the file's template as Jinja2 does.
    conversation = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                    {"role": "user", "content": "Name a colour."}]
    multi = client.chat.completions.create(model=NAME, messages=conversation, max_tokens=8, temperature=0)
    rendered = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
        template=llama.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<|im_start|>",
    )(messages=conversation).prompt
    assert multi.usage.prompt_tokens == len(llama.tokenize(rendered.encode(), add_bos=True, special=True))

    # A PEFT adapter in the Hugging Face layout loads onto the GGUF model and changes answers.
    write_peft_adapter(tmp_path / "adapter", seed=2, scale=0.08, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    r = requests.post(server.url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"lora_name": "smol-tuned", "lora_path": str(tmp_path / "adapter")})
    assert r.status_code == 200, r.text
    tuned = client.chat.completions.create(model="smol-tuned", messages=question, max_tokens=NEW_TOKENS, temperature=0)
    assert tuned.choices[0].message.content != answer
    # Streaming, mixed with the base model in one batch, gives each its own answer.
    streamed = client.chat.completions.create(model="smol-tuned", messages=question, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True)
    again = client.chat.completions.create(model=NAME, messages=question, max_tokens=NEW_TOKENS, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == tuned.choices[0].message.content
    assert again.choices[0].message.content == answer

    # An adapter for another model's shapes is refused at load, naming the tensor.
    bad = tmp_path / "bad"
    write_peft_adapter(bad, seed=3, targets=("q_proj",))
    from safetensors.numpy import load_file
    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((8, 960), np.float32)
    save_file(t, str(bad / "adapter_model.safetensors"))
    r = requests.post(server.url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"lora_name": "smol-bad", "lora_path": str(bad)})
    assert r.status_code == 400 and "layers.0.self_attn.q_proj.lora_A" in r.json()["error"]["message"]

    # Every answer is metered under the served model's real name or the adapter's.
    rows = wait_rows(str(lake), "inference_completed", 5)
    assert {r["model_id"] for r in rows} == {NAME, "smol-tuned"}
