use std::collections::HashMap;
use std::path::Path;

use arrow::array::AsArray;
use ledgerlake_ingest::demo::Workload;
use ledgerlake_ingest::{Ingestor, WriterConfig};
use ledgerlake_lakehouse::events::{Event, EventKind};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{Lake, LakeConfig};

pub fn lake(dir: &Path) -> Lake {
    Lake::new(LakeConfig::parse(dir.join("lake").to_str().unwrap()).unwrap())
}

pub fn fast() -> WriterConfig {
    WriterConfig { max_delay: std::time::Duration::from_millis(20), ..WriterConfig::default() }
}

pub async fn start(dir: &Path, index: &str) -> Ingestor {
    Ingestor::start(lake(dir), dir.join(index), fast()).await.unwrap()
}

pub fn demo(n: usize, seed: u64) -> Vec<(usize, Event)> {
    Workload::new(seed).events(n).into_iter().enumerate().collect()
}

/// Every event id stored in a table, with how often it is stored.
pub async fn stored_ids(lake: &Lake, kind: EventKind) -> HashMap<String, usize> {
    let mut writer = TableWriter::open(lake, kind).await.unwrap();
    let mut ids = HashMap::new();
    for file in writer.all_files().await.unwrap() {
        for batch in writer.read_columns(&file, &["event_id"]).await.unwrap() {
            for id in batch.column(0).as_string::<i32>().iter().flatten() {
                *ids.entry(id.to_owned()).or_insert(0) += 1;
            }
        }
    }
    ids
}

/// Every event id in the whole lake, with how often it is stored.
pub async fn all_stored_ids(lake: &Lake) -> HashMap<String, usize> {
    let mut all = HashMap::new();
    for kind in EventKind::ALL {
        for (id, n) in stored_ids(lake, *kind).await {
            *all.entry(id).or_insert(0) += n;
        }
    }
    all
}
