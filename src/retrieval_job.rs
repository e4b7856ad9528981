//! Retrieval's glue: attribution's BM25 index behind serving's `Retriever`, kept in step
//! with the lake by a thread of `up`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ledgerlake_attribution::retrieval::{self, RetrievalIndex};
use ledgerlake_lakehouse::Lake;
use ledgerlake_lakehouse::ids::DatanetId;
use ledgerlake_serving::retrieval::{Citation, RetrieveError, Retrieved, Retriever};

/// The retrieval index of a state directory.
pub fn index_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("attribution").join("retrieval")
}

/// Serving's retriever over the index.
pub struct IndexRetriever(pub Arc<RetrievalIndex>);

impl Retriever for IndexRetriever {
    fn retrieve(&self, datanets: &[DatanetId], query: &str, top_k: usize) -> Result<Vec<Retrieved>, RetrieveError> {
        let passages = self.0.search(datanets, query, top_k).map_err(|e| {
            if e.is_caller() {
                RetrieveError::Invalid(e.to_string())
            } else {
                tracing::error!(error = %e, "retrieval failed");
                RetrieveError::Unavailable(e.to_string())
            }
        })?;
        Ok(passages
            .into_iter()
            .map(|p| Retrieved {
                citation: Citation {
                    index: 0,
                    contribution_id: p.contribution_id.to_string(),
                    datanet_id: p.datanet.to_string(),
                    chunk: p.chunk,
                    relevance: f64::from(p.relevance),
                },
                text: p.text,
            })
            .collect())
    }
}

/// Opens the index and keeps it in step with the lake, at once and then every `every`, on a
/// thread of its own (reading snapshots and indexing are work `up`'s start and runtime
/// should not wait for; until the first update, searches answer that the index is not
/// ready).
pub fn start(lake: Lake, state_dir: &Path, every: Duration) -> Result<Arc<RetrievalIndex>> {
    let dir = index_dir(state_dir);
    let index = match RetrievalIndex::open(&dir) {
        Ok(index) => index,
        // Derived state: a damaged index is rebuilt from the lake.
        Err(e @ ledgerlake_attribution::Error::Corrupt(_)) => {
            tracing::warn!(error = %e, dir = %dir.display(), "rebuilding the retrieval index");
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            RetrievalIndex::open(&dir)?
        }
        Err(e) => return Err(e.into()),
    };
    let index = Arc::new(index);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let kept = index.clone();
    std::thread::Builder::new().name("retrieval".into()).spawn(move || {
        runtime.block_on(async move {
            loop {
                match retrieval::sync(&kept, &lake).await {
                    Ok(u) if u.added + u.removed > 0 => {
                        tracing::info!(added = u.added, removed = u.removed, chunks = u.chunks, "retrieval index updated")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "updating the retrieval index"),
                }
                tokio::time::sleep(every).await;
            }
        })
    })?;
    Ok(index)
}
