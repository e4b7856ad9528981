//! Retrieval-augmented requests: `"ledgerlake": {"datanets": [...], "top_k": N}` in a
//! completion request puts the most relevant passages of those datanets into the prompt,
//! and the answer cites them. Serving knows no index: the binary supplies a [`Retriever`]
//! (attribution's BM25 index over datanet snapshots).

use ledgerlake_lakehouse::ids::DatanetId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Passages retrieved when a request does not say `top_k`.
pub const DEFAULT_TOP_K: usize = 4;

/// One passage, as the retriever found it.
#[derive(Clone, Debug, PartialEq)]
pub struct Retrieved {
    pub citation: Citation,
    pub text: String,
}

/// What a completion cites: a passage of a contribution that was put into its prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Citation {
    /// `[n]` in the prompt, from 1.
    pub index: u32,
    pub contribution_id: String,
    pub datanet_id: String,
    /// Which chunk of the contribution, from 0.
    pub chunk: u32,
    /// The passage's BM25 score for the query.
    pub relevance: f64,
}

/// Why retrieval failed.
#[derive(Debug, thiserror::Error)]
pub enum RetrieveError {
    /// The request named what cannot be retrieved (an unknown or private datanet, a bad
    /// `top_k`).
    #[error("{0}")]
    Invalid(String),
    /// The index failed (the retriever has logged why; the caller is told only that).
    #[error("{0}")]
    Unavailable(String),
}

/// Finds passages for a query.
pub trait Retriever: Send + Sync {
    /// The `top_k` passages of `datanets` most relevant to `query`, most relevant first.
    fn retrieve(&self, datanets: &[DatanetId], query: &str, top_k: usize) -> Result<Vec<Retrieved>, RetrieveError>;
}

/// The request's `ledgerlake` object.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrievalRequest {
    /// Datanets (public) whose newest snapshots are searched.
    #[schema(value_type = Vec<String>, example = json!(["law"]))]
    pub datanets: Vec<DatanetId>,
    /// Passages to put into the prompt (1 to 32; 4 when absent).
    #[serde(default)]
    pub top_k: Option<usize>,
}

/// The retrieved passages as the prompt's context: a numbered list the answer can cite.
pub fn context(passages: &[Retrieved]) -> String {
    let mut out = String::from("Use these sources and cite them by number.\n");
    for p in passages {
        out.push_str(&format!("[{}] {}\n", p.citation.index, p.text.trim()));
    }
    out
}
