//! LoRA and QLoRA training: the loss falls, the adapter written in PEFT's format serves
//! the logits training computed (on a GGUF model, after the Q/K rows go back to Hugging
//! Face's order and forward again), and a run resumed from its checkpoint ends exactly
//! where an uninterrupted one does.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use ledgerlake_serving::finetune::{self, AdamW, Batch, LoraSpec, TrainableLora};
use ledgerlake_serving::gguf as ggufmod;
use ledgerlake_serving::lora::{Adapter, Projection};
use ledgerlake_serving::model::{KvCache, Llama, StepSeq};

use crate::gguf::export_as;
use crate::max_abs_diff;
use crate::model::{tiny_config, tiny_weights};

const EXAMPLES: [&[u32]; 3] = [&[5, 17, 33, 8, 60, 2, 71, 9, 40], &[12, 12, 50, 3, 88], &[70, 1, 44, 45, 46, 47]];

fn spec() -> LoraSpec {
    LoraSpec { rank: 4, alpha: 8.0, targets: vec![Projection::Q, Projection::K, Projection::V, Projection::O, Projection::Down] }
}

fn train(model: &Llama, lora: &TrainableLora, opt: &mut AdamW, steps: usize) -> Vec<f32> {
    let batch = Batch::new(&EXAMPLES).unwrap();
    (0..steps)
        .map(|_| {
            let step = finetune::backward(model, lora, &batch, 1.0, false).unwrap();
            opt.step(&lora.vars(), &step.grads, 1e-2, step.clip).unwrap();
            step.loss
        })
        .collect()
}

#[test]
fn gradient_checkpointing_and_the_striped_head_loss_change_no_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, gguf) = gguf_model(dir.path(), GgmlDType::Q8_0);
    let batch = Batch::new(&EXAMPLES).unwrap();
    for model in [&hf, &gguf] {
        let lora = TrainableLora::new(model, spec(), 3).unwrap();
        let mut opt = AdamW::new(&lora.vars(), 0.0).unwrap();
        train(model, &lora, &mut opt, 3); // B away from zero, so both halves carry gradient
        let plain = finetune::backward(model, &lora, &batch, 1.0, false).unwrap();
        let checkpointed = finetune::backward(model, &lora, &batch, 1.0, true).unwrap();
        assert!((plain.loss - checkpointed.loss).abs() <= 1e-5 * plain.loss, "{} vs {}", plain.loss, checkpointed.loss);
        for v in lora.vars() {
            let (a, b) = (plain.grads.get(v.as_tensor()).unwrap(), checkpointed.grads.get(v.as_tensor()).unwrap());
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0 && max_abs_diff(a, b) <= 1e-5 * scale, "{} of {scale}", max_abs_diff(a, b));
        }
        assert!((plain.norm - checkpointed.norm).abs() <= 1e-5 * plain.norm);
        // Both losses (whole logits; by vocabulary stripes under checkpointing) are candle's.
        let (b, t) = batch.inputs.dims2().unwrap();
        let logits = finetune::forward(model, Some(&lora), &batch.inputs).unwrap().reshape((b * t, ())).unwrap();
        let whole = candle_nn::loss::cross_entropy(&logits.index_select(&batch.rows, 0).unwrap(), &batch.targets).unwrap().to_scalar::<f32>().unwrap();
        for loss in [plain.loss, checkpointed.loss] {
            assert!((whole - loss).abs() <= 1e-5 * whole, "{whole} vs {loss}");
        }
    }
}

/// The served logits of every position of `tokens` (one prompt step).
fn served(model: &Llama, tokens: &[u32], adapter: Option<&Adapter>) -> Vec<Tensor> {
    let mut cache = KvCache::default();
    (0..tokens.len())
        .map(|i| model.step(&mut [StepSeq { tokens: &tokens[i..i + 1], cache: &mut cache, adapter }]).unwrap())
        .collect()
}

fn gguf_model(dir: &std::path::Path, format: GgmlDType) -> (Llama, Llama) {
    let config = tiny_config();
    let weights = tiny_weights(&config, 11);
    let hf = Llama::from_tensors(config.clone(), &weights, &Device::Cpu, DType::F32).unwrap();
    let path = dir.join("tiny.gguf");
    export_as(&path, &config, &weights, &[], None, format);
    (hf, ggufmod::load(&path, &Device::Cpu).unwrap().model)
}

/// Trains on `model`, saves the adapter, and checks that serving it gives the training
/// forward pass's logits; returns the loaded (Hugging Face layout) adapter.
fn train_save_serve(model: &Llama, dir: &std::path::Path) -> Adapter {
    let lora = TrainableLora::new(model, spec(), 7).unwrap();
    let batch = Batch::new(&EXAMPLES).unwrap();
    let base = finetune::loss(model, None, &batch).unwrap().to_scalar::<f32>().unwrap();
    let start = finetune::loss(model, Some(&lora), &batch).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(base, start, "B starts at zero: the adapter starts as the base model");
    let mut opt = AdamW::new(&lora.vars(), 0.0).unwrap();
    let losses = train(model, &lora, &mut opt, 40);
    let last = *losses.last().unwrap();
    assert!(last < 0.5 * start, "training lowers the loss: {start} -> {last} ({losses:?})");

    let out = dir.join("adapter");
    lora.save_peft(model, "tiny", &out).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]));
    let loaded = Adapter::load(&out, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(loaded.weights.len(), 2 * 5);
    let fitted = model.fit_adapter(loaded.clone()).unwrap();

    let tokens = EXAMPLES[0];
    let ids = Tensor::new(tokens, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let trained = finetune::forward(model, Some(&lora), &ids).unwrap().squeeze(0).unwrap();
    let scale = trained.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // Serving a GGUF model computes as llama.cpp does (f16 keys, values and attention
    // weights; activations rounded to 8 bits for quantized weights), so served and trained
    // logits differ a little even without an adapter. What must hold: the served adapter
    // moves the logits where training moved them, to within a tenth of that move (a wrong
    // row order or scale misses by the whole move).
    let bare = finetune::forward(model, None, &ids).unwrap().squeeze(0).unwrap();
    for (i, row) in served(model, tokens, Some(&fitted)).iter().enumerate() {
        let diff = max_abs_diff(&row.squeeze(0).unwrap(), &trained.get(i).unwrap());
        let moved = max_abs_diff(&bare.get(i).unwrap(), &trained.get(i).unwrap());
        assert!(moved > 0.05 * scale, "position {i}: training moved the logits by only {moved}");
        assert!(diff <= 0.1 * moved, "position {i}: served differs from trained by {diff}; training moved them by {moved}");
    }
    loaded
}

#[test]
fn lora_over_a_dense_gguf_base_trains_and_its_peft_file_fits_the_hugging_face_model() {
    let dir = tempfile::tempdir().unwrap();
    let (hf, g) = gguf_model(dir.path(), GgmlDType::F32);
    let adapter = train_save_serve(&g, dir.path());
    // The written adapter is in Hugging Face's layout: on the Hugging Face model, as is,
    // it gives what the GGUF model gives with it fitted.
    let fitted = g.fit_adapter(adapter.clone()).unwrap();
    let tokens = EXAMPLES[2];
    let on_hf = served(&hf, tokens, Some(&adapter));
    let on_gguf = served(&g, tokens, Some(&fitted));
    let bare = served(&hf, tokens, None);
    let scale = on_hf.last().unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    for i in 0..tokens.len() {
        let diff = max_abs_diff(&on_hf[i], &on_gguf[i]);
        assert!(diff <= 5e-3 * scale, "position {i}: {diff}");
    }
    let effect = max_abs_diff(on_hf.last().unwrap(), bare.last().unwrap());
    assert!(effect > 0.1 * scale, "the trained adapter changes the logits ({effect})");
}

#[test]
fn qlora_trains_over_quantized_blocks_and_a_dense_copy_matches_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, g) = gguf_model(dir.path(), GgmlDType::Q8_0);
    assert_eq!(g.projection(0, Projection::Q).unwrap().format(), "q8_0", "the base stays quantized");
    train_save_serve(&g, dir.path());
    // LoRA over the dequantized copy computes the same loss as QLoRA over the blocks.
    let dense = finetune::dequantized(&g).unwrap();
    assert_eq!(dense.projection(0, Projection::Q).unwrap().format(), "f32");
    let batch = Batch::new(&EXAMPLES).unwrap();
    let lora = TrainableLora::new(&g, spec(), 3).unwrap();
    let mut opt = AdamW::new(&lora.vars(), 0.0).unwrap();
    train(&g, &lora, &mut opt, 3);
    let q = finetune::loss(&g, Some(&lora), &batch).unwrap().to_scalar::<f32>().unwrap();
    let d = finetune::loss(&dense, Some(&lora), &batch).unwrap().to_scalar::<f32>().unwrap();
    assert!((q - d).abs() < 1e-4, "{q} vs {d}");
}

#[test]
fn a_run_resumed_from_its_checkpoint_ends_exactly_where_an_uninterrupted_one_does() {
    let config = tiny_config();
    let model = Llama::from_tensors(config.clone(), &tiny_weights(&config, 4), &Device::Cpu, DType::F32).unwrap();
    let straight = TrainableLora::new(&model, spec(), 9).unwrap();
    let mut opt = AdamW::new(&straight.vars(), 0.01).unwrap();
    train(&model, &straight, &mut opt, 6);

    let dir = tempfile::tempdir().unwrap();
    let first = TrainableLora::new(&model, spec(), 9).unwrap();
    let mut opt = AdamW::new(&first.vars(), 0.01).unwrap();
    assert!(!finetune::load_state(dir.path(), &first, &mut opt).unwrap(), "no checkpoint yet");
    train(&model, &first, &mut opt, 3);
    finetune::save_state(dir.path(), &first, &opt).unwrap();
    drop(first);
    // A new process: fresh pairs (another seed, to show the checkpoint decides) and moments.
    let resumed = TrainableLora::new(&model, spec(), 1234).unwrap();
    let mut opt = AdamW::new(&resumed.vars(), 0.01).unwrap();
    assert!(finetune::load_state(dir.path(), &resumed, &mut opt).unwrap());
    assert_eq!(opt.t, 3);
    train(&model, &resumed, &mut opt, 3);
    for (a, b) in straight.vars().iter().zip(resumed.vars()) {
        assert_eq!(a.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    // A checkpoint of another shape is refused, naming the tensor.
    let other = TrainableLora::new(&model, LoraSpec { rank: 2, ..spec() }, 9).unwrap();
    let mut opt = AdamW::new(&other.vars(), 0.0).unwrap();
    let err = finetune::load_state(dir.path(), &other, &mut opt).unwrap_err().to_string();
    assert!(err.contains("param.0"), "{err}");
}

#[test]
fn gradient_features_are_an_unbiased_projection_of_the_lora_gradient() {
    let config = tiny_config();
    let model = Llama::from_tensors(config.clone(), &tiny_weights(&config, 4), &Device::Cpu, DType::F32).unwrap();
    let lora = TrainableLora::new(&model, spec(), 9).unwrap();
    let projector = finetune::Projector::new(&lora, 1).unwrap();
    assert_eq!(projector.dim(), 2 * 5 * finetune::FEATURE_PER_PAIR);
    // At initialisation B is zero, so A's gradient is zero and B's is not: the halves of
    // each pair's feature say which is which.
    let f = finetune::gradient_feature(&model, &lora, EXAMPLES[0], 1, &projector).unwrap();
    assert_eq!(f.len(), projector.dim());
    let half = finetune::FEATURE_PER_PAIR / 2;
    for pair in f.chunks(finetune::FEATURE_PER_PAIR) {
        assert!(pair[..half].iter().all(|&v| v == 0.0));
        assert!(pair[half..].iter().any(|&v| v != 0.0));
    }
    assert_eq!(f, finetune::gradient_feature(&model, &lora, EXAMPLES[0], 1, &projector).unwrap(), "deterministic");
    assert!(finetune::gradient_feature(&model, &lora, EXAMPLES[0], 9, &projector).is_err(), "nothing to predict");

    // After some training both halves carry gradient. Averaged over projection seeds, the
    // features' inner product is the gradients' inner product (E[PᵀP] = I).
    let mut opt = AdamW::new(&lora.vars(), 0.0).unwrap();
    train(&model, &lora, &mut opt, 5);
    let grad = |tokens: &[u32], from: usize| -> Vec<f32> {
        let n = tokens.len() - 1;
        let batch = Batch::new(&[tokens]).unwrap();
        let rows: Vec<u32> = (from - 1..n).map(|i| i as u32).collect();
        let targets = tokens[from..].to_vec();
        let count = rows.len();
        let batch = Batch {
            rows: Tensor::from_vec(rows, count, &Device::Cpu).unwrap(),
            targets: Tensor::from_vec(targets, count, &Device::Cpu).unwrap(),
            tokens: count,
            ..batch
        };
        let grads = finetune::loss(&model, Some(&lora), &batch).unwrap().backward().unwrap();
        lora.vars().iter().flat_map(|v| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    };
    let (x, y) = (EXAMPLES[0], EXAMPLES[2]);
    let (gx, gy) = (grad(x, 1), grad(y, 3));
    let exact: f64 = gx.iter().zip(&gy).map(|(a, b)| *a as f64 * *b as f64).sum();
    let norm: f64 = (gx.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() * gy.iter().map(|a| (*a as f64).powi(2)).sum::<f64>()).sqrt();
    let seeds = 200;
    let mut mean = 0.0;
    for seed in 0..seeds {
        let p = finetune::Projector::new(&lora, seed).unwrap();
        let fx = finetune::gradient_feature(&model, &lora, x, 1, &p).unwrap();
        let fy = finetune::gradient_feature(&model, &lora, y, 3, &p).unwrap();
        mean += fx.iter().zip(&fy).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / seeds as f64;
    }
    assert!((mean - exact).abs() < 0.1 * norm, "mean projected inner product {mean}, exact {exact}, norms {norm}");
}
