//! Retrieval: BM25 over the chunks of the contributions approved in public datanets
//! (tantivy), for requests that ask serving to put passages of datanets into the prompt.
//! Whatever a passage is retrieved for cites its contribution, and attribution's retrieval
//! method pays the cited contributions by relevance (`docs/attribution.md`).
//!
//! The index holds, for every contribution of every public datanet's newest snapshot, its
//! chunks (at most [`CHUNK_WORDS`] words each, cut at a sentence end where one is near):
//! contribution id, datanet, contributor, chunk number and text. [`RetrievalIndex::update`]
//! makes it hold exactly a given set of contributions (adding what is new, deleting what
//! left: rejected, flagged, or in a datanet made private) in one tantivy commit, so a
//! crash leaves the previous state; [`sync`] computes that set from the lake.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, RwLock};

use ledgerlake_lakehouse::{EventKind, Lake};
use ledgerlake_lakehouse::events::Visibility;
use ledgerlake_lakehouse::ids::{Address, ContributionId, DatanetId};
use ledgerlake_lakehouse::snapshot::{self, SnapshotRef};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery};
use tantivy::schema::{Field, IndexRecordOption, STORED, STRING, Schema, TEXT, Value};
use tantivy::tokenizer::TokenStream;
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term, doc};

use crate::Error;
use crate::job::lake_error;

/// The most words of one chunk.
pub const CHUNK_WORDS: usize = 160;
/// The most bytes of one chunk: text without spaces (a hash, minified code) is cut into
/// "words" of at most [`MAX_WORD_BYTES`], and a chunk ends before it would pass this.
pub const MAX_CHUNK_BYTES: usize = 2048;
/// The most bytes of one word of a chunk (cut at a character boundary).
pub const MAX_WORD_BYTES: usize = 256;
/// The most datanets one request may search.
pub const MAX_DATANETS: usize = 64;
/// The most passages one request may retrieve.
pub const MAX_TOP_K: usize = 32;
/// A query's distinct terms beyond this many are not searched (a long prompt's first ones
/// are kept).
pub const MAX_QUERY_TERMS: usize = 64;

/// One retrieved passage.
#[derive(Clone, Debug, PartialEq)]
pub struct Passage {
    pub contribution_id: ContributionId,
    pub contributor: Address,
    pub datanet: DatanetId,
    /// Which chunk of the contribution, from 0.
    pub chunk: u32,
    pub text: String,
    /// BM25 (k1 = 1.2, b = 0.75) of the query's terms in the chunk.
    pub relevance: f32,
}

/// A contribution the index should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    pub contributor: Address,
    pub datanet: DatanetId,
    pub content: String,
}

/// What an update changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Updated {
    pub added: usize,
    pub removed: usize,
    pub chunks: usize,
}

/// `text` in chunks of at most [`CHUNK_WORDS`] words and [`MAX_CHUNK_BYTES`] bytes, in
/// order, each a slice of `text`: a chunk ends after the last sentence end (`.`, `!`, `?`
/// or a line break) in its second half, else after its last word. Text without words has
/// no chunks.
pub fn chunks(text: &str) -> Vec<&str> {
    // Each word's byte range; a word longer than MAX_WORD_BYTES is cut into pieces.
    let mut words: Vec<(usize, usize)> = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                words.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            (false, Some(s)) if i + c.len_utf8() - s > MAX_WORD_BYTES => {
                words.push((s, i));
                start = Some(i);
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, text.len()));
    }
    let ends_sentence = |w: usize| {
        let (s, e) = words[w];
        let word = &text[s..e];
        let after = &text[e..words.get(w + 1).map_or(text.len(), |n| n.0)];
        word.ends_with(['.', '!', '?']) || after.contains('\n')
    };
    let mut out = Vec::new();
    let mut first = 0;
    while first < words.len() {
        // A word is at most MAX_WORD_BYTES < MAX_CHUNK_BYTES, so a chunk holds at least one.
        let mut last = first;
        while last + 1 < words.len() && last + 1 - first < CHUNK_WORDS && words[last + 1].1 - words[first].0 <= MAX_CHUNK_BYTES {
            last += 1;
        }
        let end = if last + 1 == words.len() {
            last
        } else {
            (first + (last - first).div_ceil(2)..=last).rev().find(|&w| ends_sentence(w)).unwrap_or(last)
        };
        out.push(&text[words[first].0..words[end].1]);
        first = end + 1;
    }
    out
}

struct Fields {
    contribution: Field,
    datanet: Field,
    contributor: Field,
    chunk: Field,
    text: Field,
}

/// The retrieval index: a tantivy index in a directory of local state, and the datanets'
/// visibility as of the last update.
pub struct RetrievalIndex {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
    /// The datanets' visibility as of the last update; `None` before the first.
    datanets: RwLock<Option<HashMap<DatanetId, Visibility>>>,
    /// The contributions the index holds (read from the index once, then kept).
    held: Mutex<Option<HashSet<ContributionId>>>,
    /// The versions of the tables the last [`sync`] read, to skip one with nothing new.
    synced: Mutex<Option<Vec<Option<u64>>>>,
}

fn tantivy_error(what: &str) -> impl FnOnce(tantivy::TantivyError) -> Error + '_ {
    move |e| Error::Internal(format!("{what}: {e}"))
}

impl RetrievalIndex {
    /// Opens the index in `dir`, creating it when absent. One process at a time writes
    /// it (tantivy's lock file).
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut schema = Schema::builder();
        let fields = Fields {
            contribution: schema.add_text_field("contribution_id", STRING | STORED),
            datanet: schema.add_text_field("datanet_id", STRING | STORED),
            contributor: schema.add_text_field("contributor", STORED),
            chunk: schema.add_u64_field("chunk", STORED),
            text: schema.add_text_field("text", TEXT | STORED),
        };
        let schema = schema.build();
        let directory = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| Error::Corrupt(format!("retrieval index {}: {e}", dir.display())))?;
        let index = Index::open_or_create(directory, schema.clone())
            .map_err(|e| Error::Corrupt(format!("retrieval index {}: {e}", dir.display())))?;
        if index.schema() != schema {
            return Err(Error::Corrupt(format!("retrieval index {} has another schema", dir.display())));
        }
        // One indexing thread: updates are small and share the machine with serving.
        let writer = index.writer_with_num_threads(1, 32 << 20).map_err(tantivy_error("opening the retrieval index's writer"))?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(tantivy_error("opening the retrieval index's reader"))?;
        Ok(Self {
            index,
            reader,
            writer: Mutex::new(writer),
            fields,
            datanets: RwLock::new(None),
            held: Mutex::new(None),
            synced: Mutex::new(None),
        })
    }

    /// The contributions the index holds now.
    pub fn contributions(&self) -> Result<HashSet<ContributionId>, Error> {
        let searcher = self.reader.searcher();
        let mut out = HashSet::new();
        for segment in searcher.segment_readers() {
            let store = segment.get_store_reader(1).map_err(|e| Error::Internal(format!("reading the retrieval index: {e}")))?;
            for doc in segment.doc_ids_alive() {
                let d: TantivyDocument = store.get(doc).map_err(tantivy_error("reading the retrieval index"))?;
                if let Some(id) = d.get_first(self.fields.contribution).and_then(|v| v.as_str()) {
                    let id = id.parse().map_err(|e| Error::Corrupt(format!("retrieval index: contribution id {id:?}: {e}")))?;
                    out.insert(id);
                }
            }
        }
        Ok(out)
    }

    /// Makes the index hold exactly `wanted` (one commit), and remembers `datanets`'
    /// visibility for [`RetrievalIndex::search`]'s errors.
    pub fn update(
        &self,
        wanted: &HashMap<ContributionId, Wanted>,
        datanets: HashMap<DatanetId, Visibility>,
    ) -> Result<Updated, Error> {
        let mut held = self.held.lock().map_err(|_| Error::Internal("a retrieval index update panicked".into()))?;
        let have = match held.take() {
            Some(h) => h,
            None => self.contributions()?,
        };
        let mut writer = self.writer.lock().map_err(|_| Error::Internal("the retrieval index's writer panicked".into()))?;
        match self.apply(&mut writer, &have, wanted) {
            Ok(updated) => {
                *held = Some(wanted.keys().cloned().collect());
                *self.datanets.write().unwrap_or_else(|e| e.into_inner()) = Some(datanets);
                Ok(updated)
            }
            Err(e) => {
                // Nothing of a failed update stays queued for the next commit; `held` is
                // read from the index again.
                if let Err(r) = writer.rollback() {
                    tracing::warn!(error = %r, "rolling back a failed retrieval index update");
                }
                Err(e)
            }
        }
    }

    fn apply(&self, writer: &mut IndexWriter, have: &HashSet<ContributionId>, wanted: &HashMap<ContributionId, Wanted>) -> Result<Updated, Error> {
        let mut updated = Updated::default();
        for gone in have.iter().filter(|id| !wanted.contains_key(*id)) {
            writer.delete_term(Term::from_field_text(self.fields.contribution, gone.as_str()));
            updated.removed += 1;
        }
        let mut new: Vec<(&ContributionId, &Wanted)> = wanted.iter().filter(|(id, _)| !have.contains(*id)).collect();
        new.sort_by(|a, b| a.0.cmp(b.0));
        for (id, w) in new {
            // A half-written earlier update cannot have left chunks (commits are
            // atomic), but deleting first keeps an update idempotent regardless.
            writer.delete_term(Term::from_field_text(self.fields.contribution, id.as_str()));
            for (n, text) in chunks(&w.content).into_iter().enumerate() {
                writer
                    .add_document(doc!(
                        self.fields.contribution => id.as_str(),
                        self.fields.datanet => w.datanet.as_str(),
                        self.fields.contributor => w.contributor.to_string(),
                        self.fields.chunk => n as u64,
                        self.fields.text => text,
                    ))
                    .map_err(tantivy_error("adding to the retrieval index"))?;
                updated.chunks += 1;
            }
            updated.added += 1;
        }
        if updated.added + updated.removed > 0 {
            writer.commit().map_err(tantivy_error("committing the retrieval index"))?;
            self.reader.reload().map_err(tantivy_error("reloading the retrieval index"))?;
        }
        Ok(updated)
    }

    /// The `top_k` chunks of `datanets` most relevant to `query` by BM25, most relevant
    /// first (ties by contribution id and chunk). A datanet that is not public, or that
    /// did not exist at the last update, is the caller's error.
    pub fn search(&self, datanets: &[DatanetId], query: &str, top_k: usize) -> Result<Vec<Passage>, Error> {
        if datanets.is_empty() {
            return Err(Error::Invalid("name at least one datanet to retrieve from".into()));
        }
        let datanets: Vec<&DatanetId> = {
            let mut unique: Vec<&DatanetId> = datanets.iter().collect();
            unique.sort();
            unique.dedup();
            unique
        };
        if datanets.len() > MAX_DATANETS {
            return Err(Error::Invalid(format!("at most {MAX_DATANETS} datanets per request, got {}", datanets.len())));
        }
        if !(1..=MAX_TOP_K).contains(&top_k) {
            return Err(Error::Invalid(format!("top_k must be between 1 and {MAX_TOP_K}, got {top_k}")));
        }
        {
            let known = self.datanets.read().unwrap_or_else(|e| e.into_inner());
            let Some(known) = known.as_ref() else {
                return Err(Error::Internal("the retrieval index has not been built yet".into()));
            };
            for &d in &datanets {
                match known.get(d) {
                    Some(Visibility::Public) => {}
                    Some(Visibility::Private) => {
                        return Err(Error::Invalid(format!("datanet {d} is private: retrieval reads public datanets only")));
                    }
                    None => return Err(Error::Invalid(format!("datanet {d} does not exist (or is newer than the retrieval index)"))),
                }
            }
        }
        let mut analyzer = self.index.tokenizer_for_field(self.fields.text).map_err(tantivy_error("the text field's tokenizer"))?;
        let mut terms: Vec<String> = Vec::new();
        let mut stream = analyzer.token_stream(query);
        while stream.advance() {
            let t = &stream.token().text;
            if !terms.contains(t) {
                terms.push(t.clone());
                if terms.len() == MAX_QUERY_TERMS {
                    break;
                }
            }
        }
        if terms.is_empty() {
            return Ok(vec![]);
        }
        let text: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .map(|t| {
                let q: Box<dyn Query> = Box::new(TermQuery::new(Term::from_field_text(self.fields.text, t), IndexRecordOption::WithFreqs));
                (Occur::Should, q)
            })
            .collect();
        let within: Vec<(Occur, Box<dyn Query>)> = datanets
            .iter()
            .map(|d| {
                let q: Box<dyn Query> = Box::new(TermQuery::new(Term::from_field_text(self.fields.datanet, d.as_str()), IndexRecordOption::Basic));
                (Occur::Should, q)
            })
            .collect();
        // The datanet filter scores nothing: relevance is the text's BM25 alone.
        let query = BooleanQuery::new(vec![
            (Occur::Must, Box::new(BooleanQuery::new(text))),
            (Occur::Must, Box::new(ConstScoreQuery::new(Box::new(BooleanQuery::new(within)), 0.0))),
        ]);
        let searcher = self.reader.searcher();
        // More than asked, so that ties at the cut are broken by id, not by segment order.
        let hits = searcher.search(&query, &TopDocs::with_limit(top_k * 2)).map_err(tantivy_error("searching the retrieval index"))?;
        let mut out = Vec::with_capacity(hits.len());
        for (score, address) in hits {
            let d: TantivyDocument = searcher.doc(address).map_err(tantivy_error("reading the retrieval index"))?;
            let text_of = |f: Field| d.get_first(f).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let corrupt = |what: &str, e: String| Error::Corrupt(format!("retrieval index: {what}: {e}"));
            out.push(Passage {
                contribution_id: text_of(self.fields.contribution).parse().map_err(|e| corrupt("contribution id", format!("{e}")))?,
                contributor: text_of(self.fields.contributor).parse().map_err(|e| corrupt("contributor", format!("{e}")))?,
                datanet: text_of(self.fields.datanet).parse().map_err(|e| corrupt("datanet", format!("{e}")))?,
                chunk: d.get_first(self.fields.chunk).and_then(|v| v.as_u64()).unwrap_or_default() as u32,
                text: text_of(self.fields.text),
                relevance: score,
            });
        }
        out.sort_by(|a, b| {
            b.relevance.total_cmp(&a.relevance).then_with(|| a.contribution_id.cmp(&b.contribution_id)).then(a.chunk.cmp(&b.chunk))
        });
        out.truncate(top_k);
        Ok(out)
    }

    /// How many chunks the index holds.
    pub fn chunk_count(&self) -> u64 {
        self.reader.searcher().num_docs()
    }
}

/// Brings `index` to the lake's newest snapshots: every approved contribution of every
/// public datanet. Does nothing when none of the tables the snapshots read changed since
/// the last sync.
pub async fn sync(index: &RetrievalIndex, lake: &Lake) -> Result<Updated, Error> {
    let mut versions = Vec::new();
    for kind in [EventKind::DatanetCreated, EventKind::DatanetUpdated, EventKind::ContributionSubmitted, EventKind::ContributionReviewed] {
        versions.push(lake.open(kind).await.map_err(lake_error)?.and_then(|t| t.version()).map(|v| v as u64));
    }
    if index.synced.lock().map_err(|_| Error::Internal("a retrieval sync panicked".into()))?.as_ref() == Some(&versions) {
        return Ok(Updated::default());
    }
    let mut wanted = HashMap::new();
    let mut datanets = HashMap::new();
    for id in snapshot::datanet_ids(lake).await.map_err(lake_error)? {
        let visibility = snapshot::datanet(lake, &id).await.map_err(lake_error)?.visibility;
        datanets.insert(id.clone(), visibility);
        if visibility != Visibility::Public {
            continue;
        }
        let snap = snapshot::snapshot(lake, &SnapshotRef { datanet: id.clone(), version: None }).await.map_err(lake_error)?;
        for c in snap.contributions {
            wanted.insert(c.contribution_id, Wanted { contributor: c.contributor, datanet: id.clone(), content: c.content });
        }
    }
    let updated = index.update(&wanted, datanets)?;
    // Tables read before the snapshots: a commit landing in between is read next time.
    *index.synced.lock().map_err(|_| Error::Internal("a retrieval sync panicked".into()))? = Some(versions);
    Ok(updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_words_in_order_within_the_limit() {
        let sentence = "one two three four five six seven. ";
        let text = format!("{}\n\n{}", sentence.repeat(40), "tail words here");
        let cs = chunks(&text);
        assert!(cs.len() > 1);
        let words: Vec<&str> = text.split_whitespace().collect();
        let rejoined: Vec<&str> = cs.iter().flat_map(|c| c.split_whitespace()).collect();
        assert_eq!(rejoined, words);
        for c in &cs {
            assert!(c.split_whitespace().count() <= CHUNK_WORDS);
        }
        // Cut after a sentence end, not mid-sentence.
        assert!(cs[0].ends_with("seven."), "{:?}", &cs[0][cs[0].len() - 20..]);
        assert!(chunks(" \n\t ").is_empty());
        assert_eq!(chunks("short"), ["short"]);
    }

    #[test]
    fn text_without_spaces_is_cut_at_character_boundaries_within_the_byte_limit() {
        // 3-byte characters with no space: one "word" of 30,000 bytes.
        let text = "語".repeat(10_000);
        let cs = chunks(&text);
        assert_eq!(cs.concat(), text, "nothing lost, nothing repeated");
        for c in &cs {
            assert!(c.len() <= MAX_CHUNK_BYTES, "{}", c.len());
            assert!(c.chars().all(|ch| ch == '語'));
        }
        assert!(cs.len() >= text.len() / MAX_CHUNK_BYTES);
    }
}
