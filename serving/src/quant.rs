//! The frozen base weights of a projection: a dense tensor (a Hugging Face checkpoint, the
//! built-in model), or GGUF's quantized blocks, which stay quantized in memory and are
//! multiplied by candle's quantized matmul.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};

use crate::{Error, Result};

/// A `[out, in]` weight `W`; [`Weight::forward`] computes `x Wᵀ`.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    Quant {
        matmul: QMatMul,
        /// `(out, in)`.
        dims: (usize, usize),
        format: GgmlDType,
        bytes: usize,
    },
}

impl Weight {
    /// A GGUF tensor: f32/f16/bf16 become dense f32, quantized formats stay quantized.
    pub fn from_qtensor(q: QTensor, name: &str) -> Result<Self> {
        let (out, inp) = q.shape().dims2().map_err(|_| Error::Weights(format!("{name} is {:?}, expected a matrix", q.shape().dims())))?;
        let format = q.dtype();
        match format {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Self::Dense(q.dequantize(&q.device())?.to_dtype(candle_core::DType::F32)?)),
            _ => {
                let bytes = q.storage_size_in_bytes();
                Ok(Self::Quant { matmul: QMatMul::from_qtensor(q)?, dims: (out, inp), format, bytes })
            }
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => Ok(w.dims2()?),
            Self::Quant { dims, .. } => Ok(*dims),
        }
    }

    /// `x Wᵀ` for rows `x` of shape `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Self::Quant { matmul, .. } => Ok(matmul.forward(&x.contiguous()?)?),
        }
    }

    /// The tensor of a dense weight (training needs one).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(w) => Some(w),
            Self::Quant { .. } => None,
        }
    }

    /// Bytes the weight takes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quant { bytes, .. } => *bytes,
        }
    }

    /// The storage format: `f32` or a GGML block type such as `q4_1`.
    pub fn format(&self) -> String {
        match self {
            Self::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
            Self::Quant { format, .. } => format!("{format:?}").to_lowercase(),
        }
    }
}
