//! LoRA adapters in the format the Python PEFT library writes, and their batched update.
//!
//! A directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! `use_rslora`, ...; fields we do not use are ignored) and `adapter_model.safetensors`
//! with, for each adapted projection, `<prefix>.layers.<i>.<block>.<proj>.lora_A.weight`
//! of shape `[r, in]` and `....lora_B.weight` of shape `[out, r]`. The update of a
//! projection `y = x Wᵀ` is `y += s · (x Aᵀ) Bᵀ` with `s = lora_alpha / r`
//! (`lora_alpha / √r` with `use_rslora`), which equals using the merged `W + s·B·A`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// The projections of a Llama block an adapter may target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    pub const ALL: [Projection; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// The module name Hugging Face and PEFT use.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The Hugging Face name of this projection's base weight in layer `layer`.
    pub fn weight_name(self, layer: usize) -> String {
        let block = if matches!(self, Self::Gate | Self::Up | Self::Down) { "mlp" } else { "self_attn" };
        format!("model.layers.{layer}.{block}.{}.weight", self.module())
    }

    /// The PEFT name of one half (`'A'` or `'B'`) of this projection's update in `layer`.
    pub fn lora_name(self, layer: usize, half: char) -> String {
        let base = self.weight_name(layer);
        let module = base.strip_suffix(".weight").unwrap_or(&base);
        format!("base_model.model.{module}.lora_{half}.weight")
    }

    fn from_module(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.module() == name)
    }
}

/// `target_modules` is a list of module names or one regular expression; we take the
/// list, and a string naming modules exactly (PEFT's `"all-linear"` is the whole list).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// The fields of PEFT's `adapter_config.json` that serving uses.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub peft_type: Option<String>,
}

impl AdapterConfig {
    /// The config of an adapter trained here: rank, alpha and the projections it adapts.
    pub fn new(r: usize, lora_alpha: f64, targets: &[Projection]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: TargetModules::List(targets.iter().map(|p| p.module().to_owned()).collect()),
            use_rslora: false,
            base_model_name_or_path: None,
            peft_type: Some("LORA".into()),
        }
    }

    /// The scale of the low-rank update.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }

    /// The projections the config names (unknown module names are an error: a PEFT
    /// adapter for another architecture).
    pub fn targets(&self) -> std::result::Result<Vec<Projection>, String> {
        let names: Vec<String> = match &self.target_modules {
            TargetModules::List(l) => l.clone(),
            TargetModules::One(s) if s == "all-linear" => return Ok(Projection::ALL.to_vec()),
            TargetModules::One(s) => s.split(['|', ',']).map(|m| m.trim().to_owned()).collect(),
        };
        names
            .iter()
            .map(|n| Projection::from_module(n).ok_or_else(|| format!("target module {n:?} is not a Llama projection (q/k/v/o/gate/up/down_proj)")))
            .collect()
    }
}

/// One adapted projection: `a` is `[r, in]`, `b` is `[out, r]`.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl LoraWeights {
    /// `s · (x Aᵀ) Bᵀ` for rows `x` of shape `[n, in]`: the shrink to rank r, then the
    /// expand to `out`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)? * self.scale)?)
    }

    /// The merged weight `W + s·B·A` (the reference the unmerged path must equal).
    pub fn merge_into(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w + (self.b.matmul(&self.a)? * self.scale)?)?)
    }
}

/// A loaded adapter: its config and the weights of each (layer, projection) it adapts.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub weights: HashMap<(usize, Projection), LoraWeights>,
    /// Bytes of its tensors.
    pub bytes: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// `(layer, projection, is_a)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
fn parse_name(name: &str) -> Option<(usize, Projection, bool)> {
    let parts: Vec<&str> = name.split('.').collect();
    let at = parts.iter().position(|p| *p == "layers")?;
    let layer = parts.get(at + 1)?.parse().ok()?;
    let n = parts.len();
    if n < at + 5 || parts[n - 1] != "weight" {
        return None;
    }
    let is_a = match parts[n - 2] {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    Some((layer, Projection::from_module(parts[n - 3])?, is_a))
}

impl Adapter {
    /// A copy on another device (the active level of the cache on a GPU).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let mut weights = HashMap::with_capacity(self.weights.len());
        for (key, w) in &self.weights {
            weights.insert(*key, LoraWeights { a: w.a.to_device(device)?, b: w.b.to_device(device)?, scale: w.scale });
        }
        Ok(Self { config: self.config.clone(), weights, bytes: self.bytes })
    }

    /// Loads a PEFT adapter directory onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: config_path.display().to_string(), message: e.to_string() })?;
        let bad = |message: String| Error::Config { path: config_path.display().to_string(), message };
        if config.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(bad(format!("peft_type {:?} is not LORA", config.peft_type)));
        }
        if config.r == 0 {
            return Err(bad("r must be at least 1".into()));
        }
        let targets = config.targets().map_err(bad)?;

        let weights_path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| match e {
            candle_core::Error::Io(source) => Error::Io { path: weights_path.display().to_string(), source },
            other => Error::Weights(format!("{}: {other}", weights_path.display())),
        })?;
        let mut halves: HashMap<(usize, Projection), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, tensor) in tensors {
            let Some((layer, projection, is_a)) = parse_name(&name) else {
                return Err(Error::Weights(format!("unexpected tensor {name:?}: expected ...layers.<i>.<block>.<proj>.lora_A|lora_B.weight")));
            };
            if !targets.contains(&projection) {
                return Err(Error::Weights(format!("{name} adapts {}, which target_modules does not name", projection.module())));
            }
            let slot = halves.entry((layer, projection)).or_default();
            let tensor = tensor.to_dtype(dtype)?;
            if is_a { slot.0 = Some(tensor) } else { slot.1 = Some(tensor) }
        }
        let mut weights = HashMap::new();
        let mut bytes = 0;
        for ((layer, projection), pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(Error::Weights(format!("layer {layer} {} has only one of lora_A and lora_B", projection.module())));
            };
            let (ra, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if ra != config.r || rb != config.r {
                return Err(Error::Weights(format!(
                    "layer {layer} {}: lora_A is {:?} and lora_B is {:?}, but r = {}",
                    projection.module(),
                    a.dims(),
                    b.dims(),
                    config.r
                )));
            }
            bytes += (a.elem_count() + b.elem_count()) * dtype.size_in_bytes();
            weights.insert((layer, projection), LoraWeights { a, b, scale: config.scale() });
        }
        if weights.is_empty() {
            return Err(Error::Weights(format!("{} holds no LoRA weights", weights_path.display())));
        }
        Ok(Self { config, weights, bytes })
    }

    pub fn get(&self, layer: usize, projection: Projection) -> Option<&LoraWeights> {
        self.weights.get(&(layer, projection))
    }
}

/// Adds each segment's low-rank update to the base output of a mixed batch.
///
/// `x` is the batch's input `[n, in]` and `base` the base projection's output `[n, out]`,
/// computed once for all rows. Rows are grouped in contiguous segments, one per adapter
/// (`None`: the bare base model); each segment gets its own shrink/expand. No weight is
/// merged or copied, so switching adapters between segments costs nothing.
pub fn apply_segments(x: &Tensor, base: &Tensor, segments: &[(Range<usize>, Option<&LoraWeights>)]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let (nb, _) = base.dims2()?;
    if n != nb {
        return Err(Error::Weights(format!("input has {n} rows, base output {nb}")));
    }
    let mut next = 0;
    let mut parts = Vec::with_capacity(segments.len());
    for (rows, lora) in segments {
        if rows.start != next || rows.end < rows.start || rows.end > n {
            return Err(Error::Weights(format!("segments must cover rows 0..{n} in order; got {rows:?} after row {next}")));
        }
        next = rows.end;
        let len = rows.end - rows.start;
        if len == 0 {
            continue;
        }
        let out = base.narrow(0, rows.start, len)?;
        parts.push(match lora {
            Some(w) => (out + w.delta(&x.narrow(0, rows.start, len)?)?)?,
            None => out,
        });
    }
    if next != n {
        return Err(Error::Weights(format!("segments cover rows 0..{next} of {n}")));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_targets() {
        assert_eq!(parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), Some((3, Projection::Q, true)));
        assert_eq!(parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight"), Some((12, Projection::Down, false)));
        assert_eq!(parse_name("base_model.model.lm_head.weight"), None);
        let config: AdapterConfig = serde_json::from_str(r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "extra": 1}"#).unwrap();
        assert_eq!(config.targets().unwrap(), vec![Projection::Q, Projection::V]);
        assert_eq!(config.scale(), 2.0);
        let config: AdapterConfig = serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": true}"#).unwrap();
        assert_eq!(config.targets().unwrap().len(), 7);
        assert_eq!(config.scale(), 4.0);
        let config: AdapterConfig = serde_json::from_str(r#"{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}"#).unwrap();
        assert!(config.targets().is_err());
    }
}
