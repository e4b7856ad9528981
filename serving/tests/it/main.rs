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
