//! LoRA adapters: the unmerged update equals the merged weight, a mixed batch equals each
//! row run alone, and PEFT's on-disk format loads.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use ledgerlake_serving::Error;
use ledgerlake_serving::lora::{Adapter, LoraWeights, Projection, apply_segments};

fn randn(shape: (usize, usize)) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn lora(out: usize, inp: usize, r: usize, scale: f64) -> LoraWeights {
    LoraWeights { a: randn((r, inp)), b: randn((out, r)), scale }
}

#[test]
fn unmerged_update_equals_the_merged_weight() {
    let (out, inp) = (96, 64);
    let w = randn((out, inp));
    let x = randn((5, inp));
    let l = lora(out, inp, 8, 16.0 / 8.0);
    let unmerged = (x.matmul(&w.t().unwrap()).unwrap() + l.delta(&x).unwrap()).unwrap();
    let merged = x.matmul(&l.merge_into(&w).unwrap().t().unwrap()).unwrap();
    let diff = max_abs_diff(&unmerged, &merged);
    assert!(diff <= 1e-4, "max |unmerged - merged| = {diff}");
    // And the update is not nothing: the adapter changes the output.
    assert!(max_abs_diff(&unmerged, &x.matmul(&w.t().unwrap()).unwrap()) > 1e-2);
}

#[test]
fn a_mixed_batch_equals_each_row_alone() {
    let (out, inp) = (48, 32);
    let w = randn((out, inp));
    let (l1, l2) = (lora(out, inp, 4, 2.0), lora(out, inp, 16, 0.5));
    let x = randn((7, inp));
    let base = x.matmul(&w.t().unwrap()).unwrap();
    let mixed = apply_segments(&x, &base, &[(0..2, Some(&l1)), (2..3, None), (3..3, Some(&l1)), (3..7, Some(&l2))]).unwrap();
    for row in 0..7 {
        let xr = x.narrow(0, row, 1).unwrap();
        let alone = xr.matmul(&w.t().unwrap()).unwrap();
        let alone = match row {
            0..2 => (alone + l1.delta(&xr).unwrap()).unwrap(),
            2 => alone,
            _ => (alone + l2.delta(&xr).unwrap()).unwrap(),
        };
        let diff = max_abs_diff(&mixed.narrow(0, row, 1).unwrap(), &alone);
        assert!(diff <= 1e-4, "row {row}: {diff}");
    }
    // Segments must cover the batch in order.
    assert!(apply_segments(&x, &base, &[(0..3, None)]).is_err());
    assert!(apply_segments(&x, &base, &[(0..3, None), (2..7, None)]).is_err());
}

/// An adapter directory as PEFT's `save_pretrained` writes it.
fn write_peft(dir: &std::path::Path, config: &str, tensors: HashMap<String, Tensor>) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
}

const PEFT_CONFIG: &str = r#"{
  "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "ledgerlake-base",
  "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
  "layers_pattern": null, "layers_to_transform": null, "lora_alpha": 16, "lora_dropout": 0.05,
  "modules_to_save": null, "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": null,
  "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false
}"#;

fn peft_tensors(layers: usize, r: usize) -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    for layer in 0..layers {
        for proj in ["q_proj", "v_proj"] {
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{proj}");
            t.insert(format!("{prefix}.lora_A.weight"), randn((r, 32)));
            t.insert(format!("{prefix}.lora_B.weight"), randn((48, r)));
        }
    }
    t
}

#[test]
fn peft_adapters_load_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_peft(dir.path(), PEFT_CONFIG, peft_tensors(2, 4));
    let adapter = Adapter::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(adapter.weights.len(), 4);
    assert_eq!(adapter.bytes, 4 * (4 * 32 + 48 * 4) * 4);
    let q = adapter.get(1, Projection::Q).unwrap();
    assert_eq!((q.a.dims(), q.b.dims(), q.scale), (&[4, 32][..], &[48, 4][..], 4.0));
    assert!(adapter.get(0, Projection::K).is_none());

    // Half a pair.
    let mut t = peft_tensors(1, 4);
    t.remove("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
    write_peft(dir.path(), PEFT_CONFIG, t);
    assert!(matches!(Adapter::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Weights(m)) if m.contains("only one")));
    // Rank that disagrees with the config.
    write_peft(dir.path(), PEFT_CONFIG, peft_tensors(1, 8));
    assert!(matches!(Adapter::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Weights(m)) if m.contains("r = 4")));
    // A projection the config does not target.
    let mut t = peft_tensors(1, 4);
    t.insert("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight".into(), randn((4, 32)));
    write_peft(dir.path(), PEFT_CONFIG, t);
    assert!(matches!(Adapter::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Weights(m)) if m.contains("up_proj")));
    // Not a LoRA config, and no directory at all.
    write_peft(dir.path(), r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "IA3"}"#, peft_tensors(1, 4));
    assert!(matches!(Adapter::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Config { .. })));
    assert!(matches!(Adapter::load(&dir.path().join("missing"), &Device::Cpu, DType::F32), Err(Error::Io { .. })));
}

/// Adapter loading never panics, whatever the config and the safetensors bytes hold (a
/// garbled header, a truncated file, a config with odd values): it loads or says why.
mod adapter_fuzz {
    use super::*;
    use proptest::prelude::*;

    fn valid_safetensors() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        write_peft(dir.path(), PEFT_CONFIG, peft_tensors(1, 4));
        std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap()
    }

    fn config_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        let any_json = prop_oneof![
            Just(json!(null)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            "[ -~]{0,20}".prop_map(|s| json!(s)),
            Just(json!(["q_proj", "v_proj"])),
            Just(json!([1, 2])),
            Just(json!({})),
        ];
        (prop::sample::select(vec!["r", "lora_alpha", "target_modules", "use_rslora", "peft_type"]), any_json).prop_map(|(field, value)| {
            let mut config: serde_json::Value = serde_json::from_str(PEFT_CONFIG).unwrap();
            config[field] = value;
            config
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn loading_garbled_adapters_never_panics(
            config in config_value(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            header_len in prop::option::of(any::<u64>()),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = valid_safetensors();
            for (at, byte) in &edits {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1).max(if edits.is_empty() { 0 } else { 1 }));
            if let Some(n) = header_len && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
            std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
            std::fs::write(dir.path().join("adapter_model.safetensors"), &bytes).unwrap();
            match Adapter::load(dir.path(), &Device::Cpu, DType::F32) {
                Ok(adapter) => prop_assert!(!adapter.weights.is_empty()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

mod engine;
mod finetune;
mod gguf;

// ---- The Llama model -------------------------------------------------------------------

mod model {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use ledgerlake_serving::Error;
    use ledgerlake_serving::lora::{Adapter, AdapterConfig, LoraWeights, Projection};
    use ledgerlake_serving::model::{KvCache, Llama, LlamaConfig, StepSeq, TokenIds, argmax, row};
    use ledgerlake_serving::pretrain::init_weights;

    use super::max_abs_diff;

    pub fn tiny_config() -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": false,
            "torch_dtype": "float32", "attention_bias": false, "hidden_act": "silu"
        }))
        .unwrap()
    }

    /// Weights large enough that logits differ clearly between tokens.
    pub fn tiny_weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
        init_weights(config, seed).unwrap().into_iter().map(|(k, v)| {
            let v = if v.rank() == 2 { (v * 10.0).unwrap() } else { v };
            (k, v)
        }).collect()
    }

    pub fn tiny() -> Llama {
        let config = tiny_config();
        Llama::from_tensors(config.clone(), &tiny_weights(&config, 3), &Device::Cpu, DType::F32).unwrap()
    }

    /// An adapter on every projection of every layer, with random A and B.
    pub fn random_adapter(config: &LlamaConfig, r: usize, alpha: f64) -> Adapter {
        let cfg: AdapterConfig =
            serde_json::from_value(serde_json::json!({"r": r, "lora_alpha": alpha, "target_modules": "all-linear", "peft_type": "LORA"})).unwrap();
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
        let mut weights = HashMap::new();
        for layer in 0..config.num_hidden_layers {
            for p in Projection::ALL {
                let (out, inp) = match p {
                    Projection::Q => (q, d),
                    Projection::K | Projection::V => (kv, d),
                    Projection::O => (d, q),
                    Projection::Gate | Projection::Up => (f, d),
                    Projection::Down => (d, f),
                };
                let a = (Tensor::randn(0f32, 1f32, (r, inp), &Device::Cpu).unwrap() * 0.1).unwrap();
                let b = (Tensor::randn(0f32, 1f32, (out, r), &Device::Cpu).unwrap() * 0.1).unwrap();
                weights.insert((layer, p), LoraWeights { a, b, scale: cfg.scale() });
            }
        }
        Adapter { config: cfg, weights, bytes: 0 }
    }

    /// Logits of the last position of `tokens`, from the training (reference) forward pass.
    fn reference_last(model: &Llama, tokens: &[u32]) -> Tensor {
        let t = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &Device::Cpu).unwrap();
        model.forward_train(&t).unwrap().narrow(1, tokens.len() - 1, 1).unwrap().reshape(model.config.vocab_size).unwrap()
    }

    #[test]
    fn cached_steps_equal_the_full_forward_pass() {
        let model = tiny();
        let tokens: Vec<u32> = vec![1, 5, 17, 42, 8, 96, 33, 12, 7, 64, 3];
        let mut cache = KvCache::default();
        // A 6-token prefill, then one token at a time.
        let logits = model.step(&mut [StepSeq { tokens: &tokens[..6], cache: &mut cache, adapter: None }]).unwrap();
        let diff = max_abs_diff(&logits.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(), &reference_last(&model, &tokens[..6]));
        assert!(diff <= 1e-4, "prefill: {diff}");
        for end in 7..=tokens.len() {
            let logits = model.step(&mut [StepSeq { tokens: &tokens[end - 1..end], cache: &mut cache, adapter: None }]).unwrap();
            let diff = max_abs_diff(&logits.squeeze(0).unwrap(), &reference_last(&model, &tokens[..end]));
            assert!(diff <= 1e-4, "decode at {end}: {diff}");
        }
        assert_eq!(cache.len(), tokens.len());
        assert!(cache.bytes() > 0);
    }

    /// The issue's reference: serving with an unmerged adapter equals serving a model whose
    /// weights are `W + (alpha/r)·B·A`.
    #[test]
    fn unmerged_adapter_logits_equal_the_merged_model() {
        let config = tiny_config();
        let weights = tiny_weights(&config, 3);
        let model = Llama::from_tensors(config.clone(), &weights, &Device::Cpu, DType::F32).unwrap();
        let adapter = random_adapter(&config, 8, 16.0);
        let mut merged = weights.clone();
        for ((layer, p), w) in &adapter.weights {
            let block = if matches!(p, Projection::Gate | Projection::Up | Projection::Down) { "mlp" } else { "self_attn" };
            let name = format!("model.layers.{layer}.{block}.{}.weight", p.module());
            let m = w.merge_into(&merged[&name]).unwrap();
            merged.insert(name, m);
        }
        let merged = Llama::from_tensors(config, &merged, &Device::Cpu, DType::F32).unwrap();
        let tokens = [1u32, 9, 27, 81, 4, 50];
        let (mut c1, mut c2, mut c3) = (KvCache::default(), KvCache::default(), KvCache::default());
        let unmerged = model.step(&mut [StepSeq { tokens: &tokens, cache: &mut c1, adapter: Some(&adapter) }]).unwrap();
        let reference = merged.step(&mut [StepSeq { tokens: &tokens, cache: &mut c2, adapter: None }]).unwrap();
        let base = model.step(&mut [StepSeq { tokens: &tokens, cache: &mut c3, adapter: None }]).unwrap();
        let diff = max_abs_diff(&unmerged, &reference);
        assert!(diff <= 1e-4, "max |logit diff| unmerged vs merged = {diff}");
        assert!(max_abs_diff(&unmerged, &base) > 1e-2, "the adapter must change the logits");
    }

    fn greedy_alone(model: &Llama, prompt: &[u32], adapter: Option<&Adapter>, n: usize) -> Vec<u32> {
        let mut cache = KvCache::default();
        let mut next = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let logits = model.step(&mut [StepSeq { tokens: &next, cache: &mut cache, adapter }]).unwrap();
            let id = argmax(&row(&logits, 0).unwrap());
            out.push(id);
            next = vec![id];
        }
        out
    }

    #[test]
    fn a_mixed_batch_gives_each_request_its_tokens_alone() {
        let config = tiny_config();
        let model = tiny();
        let (a1, a2) = (random_adapter(&config, 4, 8.0), random_adapter(&config, 16, 16.0));
        let prompts: [&[u32]; 4] = [&[1, 5, 9], &[1, 70, 71, 72, 73, 74], &[1, 2], &[1, 30, 31, 32]];
        let adapters = [Some(&a1), Some(&a1), None, Some(&a2)];
        let n = 12;
        let alone: Vec<Vec<u32>> = prompts.iter().zip(adapters).map(|(p, a)| greedy_alone(&model, p, a, n)).collect();
        // Together: one step holds all four prefills, then the decodes share each step.
        let mut caches = vec![KvCache::default(); 4];
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut together = vec![Vec::new(); 4];
        for _ in 0..n {
            let mut seqs: Vec<StepSeq> = caches
                .iter_mut()
                .zip(&next)
                .zip(adapters)
                .map(|((cache, tokens), adapter)| StepSeq { tokens, cache, adapter })
                .collect();
            let logits = model.step(&mut seqs).unwrap();
            for i in 0..4 {
                let id = argmax(&row(&logits, i).unwrap());
                together[i].push(id);
                next[i] = vec![id];
            }
        }
        assert_eq!(together, alone);
        // The adapters matter: a1's prompt without a1 goes elsewhere.
        assert_ne!(greedy_alone(&model, prompts[1], None, n), alone[1]);
        // Greedy decoding is deterministic.
        assert_eq!(greedy_alone(&model, prompts[3], Some(&a2), n), alone[3]);
    }

    /// An adapter whose q_proj update has the wrong input width for this model.
    fn wrong_shaped(config: &LlamaConfig) -> Adapter {
        let mut bad = random_adapter(config, 4, 8.0);
        let w = bad.weights.get_mut(&(1, Projection::Q)).unwrap();
        w.a = Tensor::zeros((4, config.hidden_size + 3), DType::F32, &Device::Cpu).unwrap();
        bad
    }

    #[test]
    fn adapters_are_checked_against_the_base_model_naming_the_tensor() {
        let config = tiny_config();
        let model = tiny();
        assert_eq!(model.check_adapter(&random_adapter(&config, 4, 8.0)), Ok(()));
        let err = model.check_adapter(&wrong_shaped(&config)).unwrap_err();
        assert!(err.contains("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight is [4, 67]"), "{err}");
        assert!(err.contains("needs [4, 64]"), "{err}");
        let mut deep = random_adapter(&config, 4, 8.0);
        let w = deep.weights.remove(&(0, Projection::Down)).unwrap();
        deep.weights.insert((7, Projection::Down), w);
        let err = model.check_adapter(&deep).unwrap_err();
        assert!(err.contains("layers.7.mlp.down_proj.lora_A.weight adapts layer 7, but the base model has 2 layers"), "{err}");
        let mut narrow_b = random_adapter(&config, 4, 8.0);
        narrow_b.weights.get_mut(&(0, Projection::V)).unwrap().b = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(model.check_adapter(&narrow_b).unwrap_err().contains("v_proj.lora_B.weight is [5, 4]"));
    }

    /// One batch mixing a wrong-shaped adapter, a good adapter and the base model: only the
    /// wrong-shaped adapter's requests fail; the others get exactly what they get alone and
    /// keep decoding on their caches afterwards.
    #[test]
    fn a_step_failing_for_one_adapter_fails_only_its_requests() {
        let config = tiny_config();
        let model = tiny();
        let (good, bad) = (random_adapter(&config, 4, 8.0), wrong_shaped(&config));
        let prompts: [&[u32]; 4] = [&[1, 5, 9], &[1, 70, 71], &[1, 2, 3, 4], &[1, 30]];
        let adapters = [None, Some(&bad), Some(&good), Some(&good)];
        let n = 6;
        let alone: Vec<Vec<u32>> = [0, 2, 3].iter().map(|&i| greedy_alone(&model, prompts[i], adapters[i], n)).collect();
        let mut caches = vec![KvCache::default(); 4];
        let mut next: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut live = vec![true; 4];
        let mut together = vec![Vec::new(); 4];
        for step in 0..n {
            let idx: Vec<usize> = (0..4).filter(|&i| live[i]).collect();
            let mut seqs: Vec<StepSeq> = caches
                .iter_mut()
                .zip(&next)
                .zip(adapters)
                .enumerate()
                .filter(|(i, _)| live[*i])
                .map(|(_, ((cache, tokens), adapter))| StepSeq { tokens, cache, adapter })
                .collect();
            let rows = model.step_isolated(&mut seqs);
            drop(seqs);
            for (&i, row) in idx.iter().zip(rows) {
                match row {
                    Ok(logits) => {
                        let id = argmax(&logits);
                        together[i].push(id);
                        next[i] = vec![id];
                    }
                    Err(e) => {
                        assert_eq!((i, step), (1, 0), "only the wrong-shaped adapter fails, at once: {e}");
                        live[i] = false;
                    }
                }
            }
        }
        assert!(!live[1]);
        assert_eq!([together[0].clone(), together[2].clone(), together[3].clone()].to_vec(), alone);
        for i in [0, 2, 3] {
            assert_eq!(caches[i].len(), prompts[i].len() + n - 1, "cache of request {i}");
        }
        assert_eq!(caches[1].len(), 0, "the failed request's cache is put back");
    }

    #[test]
    fn hugging_face_checkpoints_load_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config();
        let weights = tiny_weights(&config, 5);
        let write = |config: &serde_json::Value, weights: &HashMap<String, Tensor>| {
            std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
            candle_core::safetensors::save(weights, dir.path().join("model.safetensors")).unwrap();
        };
        let json = serde_json::to_value(&config).unwrap();
        write(&json, &weights);
        let loaded = Llama::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let direct = Llama::from_tensors(config.clone(), &weights, &Device::Cpu, DType::F32).unwrap();
        let t = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&loaded.forward_train(&t).unwrap(), &direct.forward_train(&t).unwrap()), 0.0);
        assert_eq!(loaded.eos_ids(), vec![2]);
        assert_eq!(serde_json::from_str::<TokenIds>("[2, 3]").unwrap().to_vec(), vec![2, 3]);

        let mut missing = weights.clone();
        missing.remove("model.layers.1.mlp.up_proj.weight");
        write(&json, &missing);
        assert!(matches!(Llama::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Weights(m)) if m.contains("up_proj")));
        let mut wrong = weights.clone();
        wrong.insert("model.norm.weight".into(), Tensor::ones(63, DType::F32, &Device::Cpu).unwrap());
        write(&json, &wrong);
        assert!(matches!(Llama::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Weights(m)) if m.contains("model.norm")));
        let mut scaled = json.clone();
        scaled["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        write(&scaled, &weights);
        assert!(matches!(Llama::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Config { .. })));
        let mut gqa = json.clone();
        gqa["num_key_value_heads"] = serde_json::json!(3);
        write(&gqa, &weights);
        assert!(matches!(Llama::load(dir.path(), &Device::Cpu, DType::F32), Err(Error::Config { .. })));
        // Out-of-vocabulary ids and an over-long sequence are errors, not panics.
        let model = tiny();
        let mut cache = KvCache::default();
        assert!(model.step(&mut [StepSeq { tokens: &[500], cache: &mut cache, adapter: None }]).is_err());
        let long = vec![3u32; 65];
        assert!(model.step(&mut [StepSeq { tokens: &long, cache: &mut cache, adapter: None }]).is_err());
        assert_eq!(cache.len(), 0);
    }
}

// ---- Tokenizer and pretraining ---------------------------------------------------------

mod pretraining {
    use candle_core::{DType, Device};
    use ledgerlake_serving::model::Llama;
    use ledgerlake_serving::pretrain::{EOS, PretrainOptions, greedy, pretrain, read_corpus, train_tokenizer};
    use ledgerlake_serving::tokenizer::{TextStream, Tokenizer};

    const STORY: &str = "Once there was a little yellow Tulip, and she lived down in a little\n\
dark house under the ground. One day she was sitting there, all by\nherself, and it was very still.\n\n\
Suddenly she heard a little tap, tap, tap, at the door. \"Who is that?\" she said.\n\n";

    fn corpus(dir: &std::path::Path) {
        // One UTF-8 file and one Latin-1 file (as older Gutenberg texts are).
        std::fs::write(dir.join("a.txt"), STORY.repeat(40) + "Café au lait, naïve façade.\n").unwrap();
        let latin1: Vec<u8> = "The caf\u{e9} was warm.\n\n".repeat(30).chars().map(|c| c as u32 as u8).collect();
        std::fs::write(dir.join("b.txt"), latin1).unwrap();
        std::fs::write(dir.join("ignored.md"), "not a text file").unwrap();
    }

    #[test]
    fn tokenizer_round_trips_and_streams_whole_characters() {
        let dir = tempfile::tempdir().unwrap();
        corpus(dir.path());
        let docs = read_corpus(dir.path()).unwrap();
        assert_eq!(docs.len(), 2);
        // Paragraph lines are joined; Latin-1 is read as such.
        assert!(docs[0].1.starts_with("Once there was a little yellow Tulip, and she lived down in a little dark house"));
        assert!(docs[1].1.contains("The café was warm."));
        let hf = train_tokenizer(&docs, 300).unwrap();
        let eos = hf.token_to_id(EOS).unwrap();
        let tok = Tokenizer::from_inner(hf, Some(eos));
        let text = "A little Tulip said: \"naïve 東京\"\n";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() < text.len(), "merges shorten the text");
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.encode_prompt("hi").unwrap()[0], eos);
        // Streaming never releases half a character, and adds up to the whole text.
        let mut stream = TextStream::default();
        let mut streamed = String::new();
        for id in tok.encode("naïve 東京!").unwrap() {
            let piece = stream.push(&tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'));
            streamed.push_str(&piece);
        }
        assert_eq!(streamed, "naïve 東京!");
        // Saved and loaded as tokenizer.json.
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, tok.inner().to_string(false).unwrap()).unwrap();
        assert_eq!(Tokenizer::load(&path, None).unwrap().encode(text).unwrap(), ids);
        assert!(Tokenizer::load(&dir.path().join("a.txt"), None).is_err());
    }

    #[test]
    fn pretraining_lowers_the_loss_and_writes_a_loadable_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        corpus(dir.path());
        let out = dir.path().join("model");
        let opts = PretrainOptions {
            corpus: dir.path().to_owned(),
            out: out.clone(),
            vocab_size: 300,
            hidden_size: 32,
            intermediate_size: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 32,
            batch: 8,
            steps: 60,
            learning_rate: 1e-2,
            seed: 9,
            max_minutes: None,
        };
        let lines = std::sync::Mutex::new(Vec::new());
        let report = pretrain(&opts, &|l: &str| lines.lock().unwrap().push(l.to_owned())).unwrap();
        assert_eq!(report.steps, 60);
        // Uniform guessing over ~300 ids is ln(300) = 5.7; the repetitive corpus is learnt.
        assert!(report.train_loss < 3.0, "train loss {}", report.train_loss);
        assert!(lines.lock().unwrap().iter().any(|l| l.starts_with("step 50/60")));
        for f in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"] {
            assert!(out.join(f).exists(), "{f}");
        }
        let model = Llama::load(&out, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(model.config.num_key_value_heads, Some(2));
        let tok = Tokenizer::load(&out.join("tokenizer.json"), model.config.bos_token_id).unwrap();
        let text = greedy(&model, &tok, "Once there was", 12).unwrap();
        assert!(!text.trim().is_empty());
        // Same seed, same model.
        let again = dir.path().join("again");
        pretrain(&PretrainOptions { out: again.clone(), ..opts.clone() }, &|_: &str| {}).unwrap();
        assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), std::fs::read(again.join("model.safetensors")).unwrap());
        // A directory without text is refused.
        let empty = tempfile::tempdir().unwrap();
        assert!(pretrain(&PretrainOptions { corpus: empty.path().to_owned(), ..opts }, &|_: &str| {}).is_err());
    }
}

/// The fused training ops give candle's values and gradients.
mod ops {
    use candle_core::{D, Device, Tensor, Var};
    use ledgerlake_serving::ops::{causal_softmax, cross_entropy, rms_norm, rope, softmax_last_dim, swiglu};

    use super::max_abs_diff;

    #[test]
    fn fused_softmax_matches_candle_forward_and_backward() {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3f32, (3, 5, 17), &Device::Cpu).unwrap())).unwrap();
        let weights = Tensor::randn(0f32, 1f32, (3, 5, 17), &Device::Cpu).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let reference = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-6);
        let grad = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        assert!(max_abs_diff(&grad(fused), &grad(reference)) < 1e-5);
        // A -inf (masked) entry gets probability 0 and no gradient.
        let masked = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &Device::Cpu).unwrap();
        assert_eq!(softmax_last_dim(&masked).unwrap().to_vec2::<f32>().unwrap()[0][1], 0.0);
    }

    /// The gradients of `Σ y ⊙ weights` with respect to each of `vars`.
    fn grads_of(y: &Tensor, weights: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let g = (y * weights).unwrap().sum_all().unwrap().backward().unwrap();
        vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect()
    }

    #[test]
    fn fused_rms_norm_swiglu_and_rope_match_candle_forward_and_backward() {
        let randn = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()).unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && max_abs_diff(a, b) <= 1e-5 * scale.max(1.0), "{what}: {} of {scale}", max_abs_diff(a, b));
        };
        // RMS norm, differentiable in x and in the weight.
        let (x, w) = (randn(&[7, 33]), randn(&[33]));
        let weights = Tensor::randn(0f32, 1f32, (7, 33), &Device::Cpu).unwrap();
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let reference = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        close(&fused, &reference, "rms norm");
        for (a, b) in grads_of(&fused, &weights, &[&x, &w]).iter().zip(grads_of(&reference, &weights, &[&x, &w]).iter()) {
            close(a, b, "rms norm gradient");
        }
        // SwiGLU.
        let (g, u) = (randn(&[5, 40]), randn(&[5, 40]));
        let weights = Tensor::randn(0f32, 1f32, (5, 40), &Device::Cpu).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let reference = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        close(&fused, &reference, "swiglu");
        for (a, b) in grads_of(&fused, &weights, &[&g, &u]).iter().zip(grads_of(&reference, &weights, &[&g, &u]).iter()) {
            close(a, b, "swiglu gradient");
        }
        // RoPE, both pairings.
        let x = randn(&[2, 3, 6, 8]);
        let angles = Tensor::randn(0f32, 2f32, (6, 4), &Device::Cpu).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let weights = Tensor::randn(0f32, 1f32, (2, 3, 6, 8), &Device::Cpu).unwrap();
        for interleaved in [false, true] {
            let fused = rope(x.as_tensor(), &cos, &sin, interleaved).unwrap();
            let reference = if interleaved {
                candle_nn::rotary_emb::rope_i_slow(x.as_tensor(), &cos, &sin).unwrap()
            } else {
                candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin).unwrap()
            };
            close(&fused, &reference, "rope");
            close(&grads_of(&fused, &weights, &[&x])[0], &grads_of(&reference, &weights, &[&x])[0], "rope gradient");
        }
        // The causal softmax of scores [batch, heads, group · time, time]: scaled, masked.
        let scores = randn(&[2, 3, 2 * 5, 5]);
        let weights = Tensor::randn(0f32, 1f32, (2, 3, 10, 5), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec((0..25).map(|i| if i % 5 > i / 5 { f32::NEG_INFINITY } else { 0.0 }).collect::<Vec<f32>>(), (5, 5), &Device::Cpu).unwrap();
        let fused = causal_softmax(scores.as_tensor(), 0.3, &mask).unwrap();
        let reference = candle_nn::ops::softmax(
            &(scores.as_tensor() * 0.3).unwrap().reshape((2, 3, 2, 5, 5)).unwrap().broadcast_add(&mask).unwrap().reshape((2, 3, 10, 5)).unwrap(),
            D::Minus1,
        )
        .unwrap();
        close(&fused, &reference, "causal softmax");
        let first = fused.get(0).unwrap().get(0).unwrap().get(5).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(first[1..], [0.0; 4], "row 5 is the first query of the second group: it sees key 0 only");
        close(&grads_of(&fused, &weights, &[&scores])[0], &grads_of(&reference, &weights, &[&scores])[0], "causal softmax gradient");
        // Wrong shapes are errors, not panics.
        assert!(rms_norm(x.as_tensor(), &Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(), 1e-5).is_err());
        assert!(rope(x.as_tensor(), &cos.narrow(0, 0, 5).unwrap(), &sin.narrow(0, 0, 5).unwrap(), true).is_err());
    }

    #[test]
    fn fused_cross_entropy_matches_candle_forward_and_backward() {
        let logits = Var::from_tensor(&(Tensor::randn(0f32, 2f32, (6, 11), &Device::Cpu).unwrap())).unwrap();
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
        let fused = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let reference = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
        assert!((fused.to_scalar::<f32>().unwrap() - reference.to_scalar::<f32>().unwrap()).abs() < 1e-5);
        let grad = |loss: Tensor| loss.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
        assert!(max_abs_diff(&grad(fused), &grad(reference)) < 1e-6);
        // A target outside the classes is an error, not a panic.
        let bad = Tensor::new(&[0u32, 3, 11, 5, 5, 1], &Device::Cpu).unwrap();
        assert!(cross_entropy(logits.as_tensor(), &bad).is_err());
    }
}

#[test]
fn devices_are_named_cpu_or_cuda_and_a_missing_backend_is_explained() {
    assert!(ledgerlake_serving::device("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:x", "cuda:-1", ""] {
        let e = ledgerlake_serving::device(bad).unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
    }
    if !candle_core::utils::cuda_is_available() {
        let e = ledgerlake_serving::device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
