//! The continuous-batching engine: mixed batches, just-in-time adapter loading, the
//! adapter cache limits, stop conditions and accounting.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use ledgerlake_lakehouse::{Amount, Price};
use ledgerlake_serving::engine::{Completion, CompletionSink, Engine, EngineConfig, EngineError, FinishReason, Output, Request, Source};
use ledgerlake_serving::lora::Projection;
use ledgerlake_serving::metrics::Metrics;
use ledgerlake_serving::model::{Llama, LlamaConfig};
use ledgerlake_serving::pretrain::{EOS, train_tokenizer};
use ledgerlake_serving::sampling::SamplingParams;
use ledgerlake_serving::tokenizer::Tokenizer;
use tokio::sync::mpsc;

use crate::model::{tiny_config, tiny_weights};

/// Records completions; fails every record while `fail` is set (a spool whose disk broke).
#[derive(Default)]
struct Recorder(Mutex<Vec<Completion>>, AtomicBool);

impl CompletionSink for Recorder {
    fn record(&self, c: &Completion) -> Result<(), String> {
        if self.1.load(Ordering::SeqCst) {
            return Err("billing is down".into());
        }
        self.0.lock().unwrap().push(c.clone());
        Ok(())
    }
}

fn price(input: u128, output: u128) -> Price {
    Price::new(Amount::new(input).unwrap(), Amount::new(output).unwrap()).unwrap()
}

const BASE_PRICE: (u128, u128) = (1_000, 2_000);

fn tokenizer() -> Tokenizer {
    let text = "Once there was a little yellow Tulip, and she lived down in a little dark house under the ground.\n".repeat(20);
    let hf = train_tokenizer(&[("story".into(), text)], 120).unwrap();
    let eos = hf.token_to_id(EOS).unwrap();
    Tokenizer::from_inner(hf, Some(eos))
}

fn setup(config: EngineConfig) -> (Engine, Arc<Recorder>, LlamaConfig) {
    let tok = tokenizer();
    let mut cfg = tiny_config();
    cfg.vocab_size = tok.vocab_size();
    cfg.bos_token_id = tok.bos;
    // No end-of-sequence token: requests run to max_tokens or a stop string.
    cfg.eos_token_id = None;
    let model = Llama::from_tensors(cfg.clone(), &tiny_weights(&cfg, 11), &Device::Cpu, DType::F32).unwrap();
    let sink = Arc::new(Recorder::default());
    let base_price = price(BASE_PRICE.0, BASE_PRICE.1);
    let engine = Engine::start("base", base_price, Arc::new(model), Arc::new(tok), config, sink.clone(), Arc::new(Metrics::new()));
    (engine, sink, cfg)
}

/// A PEFT adapter directory with random weights on q and v of every layer.
fn write_adapter(dir: &Path, cfg: &LlamaConfig, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#).unwrap();
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let seeded = |shape: (usize, usize), salt: u64| {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n).map(|i| (((i as u64 + 1) * (seed * 7919 + salt)) % 1000) as f32 / 1000.0 - 0.5).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    for l in 0..cfg.num_hidden_layers {
        for (p, out, inp) in [(Projection::Q, q, cfg.hidden_size), (Projection::V, kv, cfg.hidden_size), (Projection::Down, cfg.hidden_size, cfg.intermediate_size)] {
            let block = if p == Projection::Down { "mlp" } else { "self_attn" };
            let prefix = format!("base_model.model.model.layers.{l}.{block}.{}", p.module());
            t.insert(format!("{prefix}.lora_A.weight"), seeded((4, inp), 1 + l as u64));
            t.insert(format!("{prefix}.lora_B.weight"), seeded((out, 4), 2 + l as u64));
        }
    }
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).unwrap();
}

fn request(engine: &Engine, adapter: Option<&str>, prompt: &str, max_tokens: usize) -> (Request, mpsc::UnboundedReceiver<Output>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let r = Request {
        id: format!("req-{prompt}"),
        adapter: adapter.map(str::to_owned),
        prompt: engine.tokenizer.encode_prompt(prompt).unwrap(),
        max_tokens,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        stop: vec![],
        caller: "key-1".into(),
        logprobs: None,
        bill_prompt: true,
            citations: vec![],
        output: tx,
    };
    (r, rx)
}

/// Collects a request's stream: the concatenated text pieces and the completion.
fn collect(mut rx: mpsc::UnboundedReceiver<Output>) -> Result<(String, Completion), EngineError> {
    let mut text = String::new();
    while let Some(out) = rx.blocking_recv() {
        match out {
            Output::Text(t) => text.push_str(&t),
            Output::Logprobs(_) => {}
            Output::Finished(c) => return Ok((text, c)),
            Output::Failed(e) => return Err(e),
        }
    }
    Err(EngineError::Stopped)
}

fn run(engine: &Engine, adapter: Option<&str>, prompt: &str, max_tokens: usize) -> Result<(String, Completion), EngineError> {
    let (r, rx) = request(engine, adapter, prompt, max_tokens);
    engine.submit(r)?;
    collect(rx)
}

#[test]
fn concurrent_requests_for_many_adapters_match_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink, cfg) = setup(EngineConfig::default());
    for (name, seed) in [("a1", 1), ("a2", 2), ("a3", 3)] {
        write_adapter(&dir.path().join(name), &cfg, seed);
        engine.register(name, dir.path().join(name), price(5, 7), Source::Admin).unwrap();
    }
    let cases: Vec<(Option<&str>, &str)> =
        vec![(Some("a1"), "Once there"), (None, "a little"), (Some("a2"), "the ground"), (Some("a1"), "yellow Tulip"), (Some("a3"), "she lived"), (None, "dark")];
    let alone: Vec<String> = cases.iter().map(|(a, p)| run(&engine, *a, p, 10).unwrap().0).collect();
    // All at once: they share steps.
    let rxs: Vec<_> = cases
        .iter()
        .map(|(a, p)| {
            let (r, rx) = request(&engine, *a, p, 10);
            engine.submit(r).unwrap();
            rx
        })
        .collect();
    let together: Vec<String> = rxs.into_iter().map(|rx| collect(rx).unwrap().0).collect();
    assert_eq!(together, alone);
    // Adapters change the answer (the same prompt without a1 differs).
    assert_ne!(run(&engine, None, "Once there", 10).unwrap().0, alone[0]);
    // Streamed text equals the completion text, and usage is counted.
    let (streamed, done) = run(&engine, Some("a2"), "the ground", 10).unwrap();
    assert_eq!(streamed, done.text);
    assert_eq!(done.completion_tokens, 10);
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.model, "a2");
    assert_eq!(done.prompt_tokens, engine.tokenizer.encode_prompt("the ground").unwrap().len());
    let recorded = sink.0.lock().unwrap();
    assert_eq!(recorded.len(), 2 * cases.len() + 2);
    assert!(recorded.iter().all(|c| c.caller == "key-1"));
    // Each adapter was loaded once, just in time.
    let metrics = engine.metrics.encode();
    assert!(metrics.contains("ledgerlake_serving_adapter_loads_total 3"), "{metrics}");
    assert!(metrics.contains("ledgerlake_serving_generated_tokens_total"));
}

#[test]
fn adapters_are_evicted_least_recently_used_and_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, cfg) = setup(EngineConfig { max_cpu_loras: 2, max_loras: 1, ..Default::default() });
    for (name, seed) in [("a1", 1), ("a2", 2), ("a3", 3)] {
        write_adapter(&dir.path().join(name), &cfg, seed);
        engine.register(name, dir.path().join(name), price(5, 7), Source::Admin).unwrap();
    }
    let first = run(&engine, Some("a1"), "Once there", 6).unwrap().0;
    // With max_loras = 1, requests for three adapters at once still all finish.
    let rxs: Vec<_> = ["a1", "a2", "a3", "a1"]
        .iter()
        .map(|a| {
            let (r, rx) = request(&engine, Some(a), "Once there", 6);
            engine.submit(r).unwrap();
            rx
        })
        .collect();
    let texts: Vec<String> = rxs.into_iter().map(|rx| collect(rx).unwrap().0).collect();
    assert_eq!(texts[0], first);
    assert_eq!(texts[3], first);
    // Evicted and reloaded, a1 still answers the same.
    assert_eq!(run(&engine, Some("a1"), "Once there", 6).unwrap().0, first);
    let metrics = engine.metrics.encode();
    let evictions: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ledgerlake_serving_adapter_evictions_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(evictions >= 1, "{metrics}");
    assert!(metrics.contains("ledgerlake_serving_adapters_resident 2"), "{metrics}");
}

#[test]
fn bad_requests_unknown_models_and_broken_adapters_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink, _) = setup(EngineConfig { max_waiting: 4, ..Default::default() });
    assert!(matches!(run(&engine, Some("nope"), "Once", 4), Err(EngineError::UnknownModel(m)) if m == "nope"));
    std::fs::create_dir_all(dir.path().join("broken")).unwrap();
    std::fs::write(dir.path().join("broken/adapter_config.json"), "{not json").unwrap();
    engine.register("broken", dir.path().join("broken"), price(5, 7), Source::Admin).unwrap();
    // The broken adapter fails its request; a base request submitted with it finishes.
    let (r1, rx1) = request(&engine, Some("broken"), "Once", 4);
    let (r2, rx2) = request(&engine, None, "Once", 4);
    engine.submit(r1).unwrap();
    engine.submit(r2).unwrap();
    assert!(matches!(collect(rx1), Err(EngineError::AdapterLoad { name, .. }) if name == "broken"));
    assert_eq!(collect(rx2).unwrap().1.completion_tokens, 4);
    // Parameters out of range, an empty or too long prompt.
    let (mut r, _rx) = request(&engine, None, "Once", 4);
    r.sampling.temperature = 5.0;
    assert!(matches!(engine.submit(r), Err(EngineError::BadRequest(_))));
    let (mut r, _rx) = request(&engine, None, "Once", 4);
    r.prompt.clear();
    assert!(matches!(engine.submit(r), Err(EngineError::BadRequest(_))));
    let (mut r, _rx) = request(&engine, None, "Once", 4);
    r.prompt = vec![3; 64];
    assert!(matches!(engine.submit(r), Err(EngineError::BadRequest(m)) if m.contains("context")));
    // Unregistering refuses new requests.
    assert!(engine.unregister("broken").unwrap());
    assert!(!engine.unregister("broken").unwrap());
    assert!(matches!(run(&engine, Some("broken"), "Once", 4), Err(EngineError::UnknownModel(_))));
    assert!(engine.register("base", dir.path().to_owned(), price(5, 7), Source::Admin).is_err());
    // Only completed requests were accounted.
    assert_eq!(sink.0.lock().unwrap().len(), 1);
}

#[test]
fn stop_strings_seeds_and_context_limits() {
    let (engine, _, _) = setup(EngineConfig::default());
    let (full, _) = run(&engine, None, "Once there", 16).unwrap();
    // Stop at a piece of the greedy text: the text ends before it.
    let stop: String = full.chars().skip(6).take(3).collect();
    let (mut r, rx) = request(&engine, None, "Once there", 16);
    r.stop = vec![stop.clone(), "never-seen".into()];
    engine.submit(r).unwrap();
    let (streamed, done) = collect(rx).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(done.text, full[..full.find(&stop).unwrap()]);
    assert_eq!(streamed, done.text);
    // Seeded sampling repeats itself; another seed does not (over 24 tokens).
    let sampled = |seed| {
        let (mut r, rx) = request(&engine, None, "Once there", 24);
        r.sampling = SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 40, seed: Some(seed), ..Default::default() };
        engine.submit(r).unwrap();
        collect(rx).unwrap().0
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
    // A request that would pass the 64 positions stops at the context with `length`.
    let (_, done) = run(&engine, None, "Once there", 500).unwrap();
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert!(done.prompt_tokens + done.completion_tokens <= 64);
}

#[test]
fn a_full_queue_is_refused_and_a_caller_gone_before_admission_costs_nothing() {
    let (engine, sink, _) = setup(EngineConfig { max_waiting: 0, ..Default::default() });
    assert!(matches!(run(&engine, None, "Once", 4), Err(EngineError::Overloaded(_))));
    assert!(engine.metrics.encode().contains("ledgerlake_serving_requests_waiting 0"));
    let (engine, sink2, _) = setup(EngineConfig { max_waiting: 2, ..Default::default() });
    let (r, rx) = request(&engine, None, "Once", 40);
    drop(rx);
    engine.submit(r).unwrap();
    // Its queue slot is released before the next request (queued behind it) is admitted,
    // and nothing is accounted for it.
    assert_eq!(run(&engine, None, "Once", 3).unwrap().1.completion_tokens, 3);
    assert!(engine.metrics.encode().contains("ledgerlake_serving_requests_waiting 0"));
    assert_eq!(sink2.0.lock().unwrap().len(), 1);
    assert!(sink.0.lock().unwrap().is_empty());
}

#[test]
fn every_completion_carries_the_price_it_was_admitted_at() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink, cfg) = setup(EngineConfig::default());
    write_adapter(&dir.path().join("a1"), &cfg, 1);
    engine.register("a1", dir.path().join("a1"), price(5, 7), Source::Lake).unwrap();
    assert_eq!(run(&engine, None, "Once", 3).unwrap().1.price, price(BASE_PRICE.0, BASE_PRICE.1));
    assert_eq!(run(&engine, Some("a1"), "Once", 3).unwrap().1.price, price(5, 7));
    // A later registration reprices new requests.
    engine.register("a1", dir.path().join("a1"), price(50, 70), Source::Lake).unwrap();
    assert_eq!(run(&engine, Some("a1"), "Once", 3).unwrap().1.price, price(50, 70));
    assert_eq!(sink.0.lock().unwrap().len(), 3);
    // An adapter of the lake cannot be unloaded here; an admin's can.
    assert!(matches!(engine.unregister("a1"), Err(EngineError::Conflict(m)) if m.contains("model.registered")));
    assert!(engine.is_registered("a1"));
}

#[test]
fn a_re_registration_with_a_new_path_serves_the_new_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, cfg) = setup(EngineConfig::default());
    write_adapter(&dir.path().join("v1"), &cfg, 1);
    write_adapter(&dir.path().join("v2"), &cfg, 2);
    engine.register("m", dir.path().join("v1"), price(5, 7), Source::Lake).unwrap();
    let first = run(&engine, Some("m"), "Once there", 8).unwrap().0;
    engine.register("m", dir.path().join("v2"), price(5, 7), Source::Lake).unwrap();
    let second = run(&engine, Some("m"), "Once there", 8).unwrap().0;
    assert_ne!(first, second, "the new weights answer");
    engine.register("other", dir.path().join("v2"), price(5, 7), Source::Admin).unwrap();
    assert_eq!(run(&engine, Some("other"), "Once there", 8).unwrap().0, second);
}

#[test]
fn an_answer_whose_billing_cannot_be_made_durable_is_not_delivered() {
    let (engine, sink, _) = setup(EngineConfig::default());
    sink.1.store(true, Ordering::SeqCst);
    assert!(matches!(run(&engine, None, "Once there", 5), Err(EngineError::Accounting(m)) if m == "billing is down"));
    // A stream gets its text but never its end.
    let (r, mut rx) = request(&engine, None, "Once there", 5);
    engine.submit(r).unwrap();
    let mut ends = Vec::new();
    while let Some(out) = rx.blocking_recv() {
        match out {
            Output::Text(_) | Output::Logprobs(_) => {}
            Output::Finished(_) => ends.push("finished"),
            Output::Failed(_) => ends.push("failed"),
        }
    }
    assert_eq!(ends, ["failed"]);
    // Billing back: answers are delivered again.
    sink.1.store(false, Ordering::SeqCst);
    assert_eq!(run(&engine, None, "Once there", 5).unwrap().1.completion_tokens, 5);
    assert_eq!(sink.0.lock().unwrap().len(), 1);
}

#[test]
fn a_wrong_shaped_adapter_is_refused_naming_the_tensor_and_its_neighbours_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink, cfg) = setup(EngineConfig::default());
    write_adapter(&dir.path().join("good"), &cfg, 1);
    // Written for a model twice as wide: every tensor is the wrong shape here.
    let mut wide = cfg.clone();
    wide.hidden_size *= 2;
    wide.intermediate_size *= 2;
    write_adapter(&dir.path().join("wide"), &wide, 2);
    let err = engine.check_adapter(&dir.path().join("wide")).unwrap_err();
    assert!(err.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight is [4, 128]"), "{err}");
    assert_eq!(engine.check_adapter(&dir.path().join("good")), Ok(()));
    // Registered anyway (as an old lake registration might be): its requests fail with the
    // tensor named, the base model's and the good adapter's in the same batch finish.
    engine.register("wide", dir.path().join("wide"), price(5, 7), Source::Admin).unwrap();
    engine.register("good", dir.path().join("good"), price(5, 7), Source::Admin).unwrap();
    let alone = (run(&engine, None, "Once there", 6).unwrap().0, run(&engine, Some("good"), "Once there", 6).unwrap().0);
    let rxs: Vec<_> = [Some("wide"), None, Some("good")]
        .iter()
        .map(|a| {
            let (r, rx) = request(&engine, *a, "Once there", 6);
            engine.submit(r).unwrap();
            rx
        })
        .collect();
    let mut results = rxs.into_iter().map(collect);
    assert!(matches!(results.next().unwrap(), Err(EngineError::AdapterLoad { name, message }) if name == "wide" && message.contains("lora_A.weight is [4, 128]")));
    assert_eq!(results.next().unwrap().unwrap().0, alone.0);
    assert_eq!(results.next().unwrap().unwrap().0, alone.1);
    assert_eq!(sink.0.lock().unwrap().len(), 4);
}
