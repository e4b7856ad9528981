//! The frozen base weights of a projection: a dense tensor (a Hugging Face checkpoint, the
//! built-in model), or GGUF's quantized blocks, which stay quantized in memory. On the CPU,
//! `Q4_1` and `Q8_0` blocks are multiplied by our kernels ([`crate::kernels`], llama.cpp's
//! arithmetic); other formats, and every format on a GPU, by candle's quantized matmul.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::kernels::{Format, QMatrix};

use crate::{Error, Result};

/// A `[out, in]` weight `W`; [`Weight::forward`] computes `x Wᵀ`.
#[derive(Clone, Debug)]
pub enum Weight {
    Dense(Tensor),
    /// Blocks our CPU kernels multiply (shared: a tied output layer is the embedding).
    Blocks(Arc<QMatrix>),
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
        let ours = match format {
            GgmlDType::Q4_1 if q.device().is_cpu() => Some(Format::Q4_1),
            GgmlDType::Q8_0 if q.device().is_cpu() => Some(Format::Q8_0),
            _ => None,
        };
        match (format, ours) {
            (GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16, _) => Ok(Self::Dense(q.dequantize(&q.device())?.to_dtype(DType::F32)?)),
            (_, Some(format)) => {
                let m = QMatrix::new(format, out, inp, q.data()?.into_owned()).map_err(|m| Error::Weights(format!("{name}: {m}")))?;
                Ok(Self::Blocks(Arc::new(m)))
            }
            (_, None) => {
                let bytes = q.storage_size_in_bytes();
                Ok(Self::Quant { matmul: QMatMul::from_qtensor(q)?, dims: (out, inp), format, bytes })
            }
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => Ok(w.dims2()?),
            Self::Blocks(m) => Ok((m.rows, m.cols)),
            Self::Quant { dims, .. } => Ok(*dims),
        }
    }

    /// `x Wᵀ` for rows `x` of shape `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(x.matmul(&w.t()?)?),
            Self::Blocks(m) => {
                let (n, _) = x.dims2()?;
                let input = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let out = m.matmul(&input, n).map_err(Error::Weights)?;
                Ok(Tensor::from_vec(out, (n, m.rows), x.device())?)
            }
            Self::Quant { matmul, .. } => Ok(matmul.forward(&x.contiguous()?)?),
        }
    }

    /// The tensor of a dense weight (training needs one).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(w) => Some(w),
            Self::Blocks(_) | Self::Quant { .. } => None,
        }
    }

    /// Bytes the weight takes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Blocks(m) => m.bytes(),
            Self::Quant { bytes, .. } => *bytes,
        }
    }

    /// The storage format: `f32` or a GGML block type such as `q4_1`.
    pub fn format(&self) -> String {
        match self {
            Self::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
            Self::Blocks(m) => format!("{:?}", m.format).to_lowercase(),
            Self::Quant { format, .. } => format!("{format:?}").to_lowercase(),
        }
    }
}

/// An embedding table: dense, or blocks whose rows are dequantized on lookup.
#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor),
    Blocks(Arc<QMatrix>),
}

impl Embedding {
    /// The rows of `ids` as `[ids.len(), hidden]` f32 on `device`.
    pub fn lookup(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(&Tensor::from_vec(ids.to_vec(), ids.len(), device)?, 0)?),
            Self::Blocks(m) => {
                let mut out = Vec::with_capacity(ids.len() * m.cols);
                for &id in ids {
                    let row = m.dequantize_row(id as usize).ok_or_else(|| Error::Weights(format!("token id {id} is past the vocabulary ({})", m.rows)))?;
                    out.extend(row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), m.cols), device)?)
            }
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Blocks(m) => m.bytes(),
        }
    }
}
