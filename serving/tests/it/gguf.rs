//! GGUF checkpoints: a Hugging Face model exported the way llama.cpp's converter does it
//! (tensor names, Q/K rows permuted for its rotary order, tokenizer in the metadata) loads
//! and gives the same logits, with and without a PEFT adapter in the Hugging Face layout;
//! broken files are refused with what is wrong.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use ledgerlake_serving::Error;
use ledgerlake_serving::gguf::{self as ggufmod, permute_rope_rows, tensor_name, unpermute_rope_rows};
use ledgerlake_serving::lora::{Adapter, Projection};
use ledgerlake_serving::model::{KvCache, Llama, LlamaConfig, StepSeq};

use crate::max_abs_diff;
use crate::model::{random_adapter, tiny_config, tiny_weights};

/// 94 printable ASCII characters, `Ġ` (byte-level space) and two control tokens: 97.
fn vocabulary() -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = (33u8..127).map(|b| (b as char).to_string()).collect();
    tokens.push("Ġ".into());
    tokens.extend(["<|im_start|>".to_owned(), "<|im_end|>".to_owned()]);
    let types = (0..tokens.len()).map(|i| if i >= 95 { 3 } else { 1 }).collect();
    (tokens, types)
}

/// Writes `weights` (Hugging Face names) as llama.cpp's converter would, with `metadata`
/// overriding or adding keys (a `Value::Bool(false)` under a key removes it).
fn export(path: &Path, config: &LlamaConfig, weights: &HashMap<String, Tensor>, overrides: &[(&str, Value)], skip: Option<&str>) {
    export_as(path, config, weights, overrides, skip, GgmlDType::F32)
}

/// [`export`] with the matrices stored as `format` (norms stay f32, as llama.cpp keeps them).
pub fn export_as(path: &Path, config: &LlamaConfig, weights: &HashMap<String, Tensor>, overrides: &[(&str, Value)], skip: Option<&str>, format: GgmlDType) {
    let (tokens, types) = vocabulary();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("tiny".into())),
        ("llama.block_count".into(), Value::U32(config.num_hidden_layers as u32)),
        ("llama.context_length".into(), Value::U32(config.max_position_embeddings as u32)),
        ("llama.embedding_length".into(), Value::U32(config.hidden_size as u32)),
        ("llama.feed_forward_length".into(), Value::U32(config.intermediate_size as u32)),
        ("llama.attention.head_count".into(), Value::U32(config.num_attention_heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(config.kv_heads() as u32)),
        ("llama.rope.freq_base".into(), Value::F32(config.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config.rms_norm_eps as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.into_iter().map(Value::String).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(95)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(96)),
        ("tokenizer.chat_template".into(), Value::String("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}".into())),
    ];
    for (key, value) in overrides {
        md.retain(|(k, _)| k != key);
        if !matches!(value, Value::Bool(false)) {
            md.push(((*key).to_owned(), value.clone()));
        }
    }
    let (h, kv) = (config.num_attention_heads, config.kv_heads());
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: &Tensor| {
        let dtype = if t.rank() == 2 { format } else { GgmlDType::F32 };
        tensors.push((name, QTensor::quantize(t, dtype).unwrap()))
    };
    put("token_embd.weight".into(), &weights["model.embed_tokens.weight"]);
    put("output.weight".into(), &weights["lm_head.weight"]);
    put("output_norm.weight".into(), &weights["model.norm.weight"]);
    for i in 0..config.num_hidden_layers {
        put(format!("blk.{i}.attn_norm.weight"), &weights[&format!("model.layers.{i}.input_layernorm.weight")]);
        put(format!("blk.{i}.ffn_norm.weight"), &weights[&format!("model.layers.{i}.post_attention_layernorm.weight")]);
        for p in Projection::ALL {
            let w = &weights[&p.weight_name(i)];
            let w = match p {
                Projection::Q => permute_rope_rows(w, h).unwrap(),
                Projection::K => permute_rope_rows(w, kv).unwrap(),
                _ => w.clone(),
            };
            put(tensor_name(i, p), &w);
        }
    }
    tensors.retain(|(n, _)| Some(n.as_str()) != skip);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

fn last_logits(model: &Llama, tokens: &[u32], adapter: Option<&Adapter>) -> Tensor {
    let mut cache = KvCache::default();
    let prompt = model.step(&mut [StepSeq { tokens: &tokens[..5], cache: &mut cache, adapter }]).unwrap();
    let decoded = model.step(&mut [StepSeq { tokens: &tokens[5..6], cache: &mut cache, adapter }]).unwrap();
    Tensor::cat(&[prompt, decoded], 0).unwrap()
}

#[test]
fn rope_rows_permute_like_llama_cpp_and_back() {
    // Two heads of 4 rows: Hugging Face's halves [0 1 | 2 3] become pairs [0 2 1 3].
    let t = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
    let p = permute_rope_rows(&t, 2).unwrap();
    assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    let m = Tensor::randn(0f32, 1.0, (192, 5), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&unpermute_rope_rows(&permute_rope_rows(&m, 3).unwrap(), 3).unwrap(), &m), 0.0);
}

#[test]
fn a_gguf_export_gives_the_hugging_face_logits_with_and_without_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let weights = tiny_weights(&config, 5);
    let hf = Llama::from_tensors(config.clone(), &weights, &Device::Cpu, DType::F32).unwrap();
    let path = dir.path().join("tiny.gguf");
    export(&path, &config, &weights, &[], None);
    let loaded = ggufmod::load(&path, &Device::Cpu).unwrap();
    let g = &loaded.model;
    assert_eq!(loaded.general_name.as_deref(), Some("tiny"));
    assert_eq!((g.config.num_hidden_layers, g.config.kv_heads(), g.config.vocab_size), (2, 2, 97));
    assert!(g.eos_ids().contains(&96), "<|im_end|> ends generation");
    assert_eq!(loaded.tokenizer.encode("ab c").unwrap(), vec![64, 65, 94, 66]);
    assert_eq!(loaded.tokenizer.encode("<|im_end|>").unwrap(), vec![96], "control tokens are special");
    let rendered = loaded.tokenizer.chat.render(&[ledgerlake_serving::chat::ChatMessage { role: "user".into(), content: "hi".into() }], false).unwrap();
    assert_eq!(rendered, "<|im_start|>user hi<|im_end|>");

    let tokens = [1u32, 9, 27, 81, 4, 50];
    let scale = last_logits(&hf, &tokens, None).abs().unwrap().max_keepdim(1).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    // The GGUF model keeps its KV cache, queries and attention weights in f16 (llama.cpp's
    // arithmetic): relative differences of about 1e-3 of the logits' size.
    let tolerance = 5e-3 * scale;
    let plain = max_abs_diff(&last_logits(&hf, &tokens, None), &last_logits(g, &tokens, None));
    assert!(plain <= tolerance, "{plain} > {tolerance}");

    let adapter = random_adapter(&config, 4, 8.0);
    let reference = last_logits(&hf, &tokens, Some(&adapter));
    let effect = max_abs_diff(&reference, &last_logits(&hf, &tokens, None));
    assert!(effect > 20.0 * tolerance, "the adapter changes the logits ({effect})");
    let fitted = g.fit_adapter(adapter.clone()).unwrap();
    let with = max_abs_diff(&reference, &last_logits(g, &tokens, Some(&fitted)));
    assert!(with <= tolerance, "{with} > {tolerance}");
    // Without the permutation the Q/K updates land on the wrong rows.
    let unfitted = max_abs_diff(&reference, &last_logits(g, &tokens, Some(&adapter)));
    assert!(unfitted > 10.0 * tolerance, "{unfitted}");
}

#[test]
fn broken_or_unsupported_gguf_files_are_refused_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let weights = tiny_weights(&config, 5);
    let refused = |name: &str, overrides: &[(&str, Value)], skip: Option<&str>| -> String {
        let path = dir.path().join(name);
        export(&path, &config, &weights, overrides, skip);
        match ggufmod::load(&path, &Device::Cpu) {
            Err(Error::Gguf { message, .. }) => message,
            Err(other) => panic!("{name}: expected a GGUF error, got {other}"),
            Ok(_) => panic!("{name}: loaded"),
        }
    };
    assert!(refused("arch.gguf", &[("general.architecture", Value::String("gpt2".into()))], None).contains("not llama"));
    assert!(refused("rope.gguf", &[("llama.rope.scaling.type", Value::String("yarn".into()))], None).contains("rope scaling"));
    assert!(refused("pre.gguf", &[("tokenizer.ggml.pre", Value::String("qwen2".into()))], None).contains("qwen2"));
    assert!(refused("spm.gguf", &[("tokenizer.ggml.model", Value::String("llama".into()))], None).contains("tokenizer model"));
    assert!(refused("heads.gguf", &[("llama.attention.head_count", Value::Bool(false))], None).contains("head_count"));
    assert!(refused("missing.gguf", &[], Some("blk.1.ffn_up.weight")).contains("blk.1.ffn_up.weight"));
    assert!(refused("shape.gguf", &[("llama.feed_forward_length", Value::U32(128))], None).contains("ffn_gate"));
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf file at all").unwrap();
    assert!(matches!(ggufmod::load(&garbage, &Device::Cpu), Err(Error::Gguf { message, .. }) if message.contains("not a GGUF file")));
    assert!(matches!(ggufmod::load(&dir.path().join("absent.gguf"), &Device::Cpu), Err(Error::Io { .. })));
}
