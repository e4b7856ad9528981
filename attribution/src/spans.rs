//! Span attribution's index: an infini-gram-style suffix array over the token ids of
//! contributions, with a map from positions to the contributions that hold them.
//!
//! A [`Shard`] is immutable. Its text is every document's tokens, each document preceded by
//! a separator (the largest value of the token width: `0xFFFF` for two-byte tokens, as
//! infini-gram writes it), so no n-gram crosses a document and counts equal infini-gram's
//! over the same token ids. It stores:
//! - the text in two bytes per token when every id is below `0xFFFF`, else four;
//! - the suffix array (built by induced sorting with `libsais`) bit-packed at
//!   `ceil(log2(text length))` bits per entry: 27 bits at 100M tokens;
//! - the documents' start positions (bit-packed the same way) and their 32-byte keys.
//!
//! That is `2 + bits/8` bytes per token plus 36-ish bytes per document (5.4 bytes per
//! token at 100M tokens in 200-token documents). [`SpanIndex`] is a directory of shards
//! with a manifest: adding a snapshot's contributions adds a shard without touching the
//! others, and [`SpanIndex::merge`] folds shards into one.
//!
//! Queries: [`Shard::count`] (an n-gram's occurrences, `O(m log N)`),
//! [`SpanIndex::longest_matches`] (for every position of an output, the longest prefix
//! found anywhere; `O(L log N)` binary searches, because the match at `i + 1` is at least
//! the match at `i` minus one) and [`SpanIndex::maximal_spans`].

use std::cmp::Ordering;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Error;

/// A document's key: for contributions, the 32 bytes of the contribution id.
pub type DocKey = [u8; 32];

/// The most text positions (tokens plus one separator per document) one shard holds:
/// `libsais`' 32-bit suffix arrays. A bigger snapshot is split into several shards.
pub const MAX_SHARD_POSITIONS: usize = i32::MAX as usize;

const FORMAT_VERSION: u32 = 1;

/// A shard's text: the separator-prefixed documents.
#[derive(Clone, Debug, PartialEq)]
enum Text {
    /// Every token id below `0xFFFF`; `0xFFFF` separates documents.
    U16(Vec<u16>),
    /// Any token id below `u32::MAX`; `u32::MAX` separates documents.
    U32(Vec<u32>),
}

impl Text {
    fn len(&self) -> usize {
        match self {
            Text::U16(t) => t.len(),
            Text::U32(t) => t.len(),
        }
    }

    #[inline]
    fn get(&self, i: usize) -> u32 {
        match self {
            Text::U16(t) => u32::from(t[i]),
            Text::U32(t) => t[i],
        }
    }

    /// The separator, which is also one more than the largest token id this text can hold.
    fn separator(&self) -> u32 {
        match self {
            Text::U16(_) => u32::from(u16::MAX),
            Text::U32(_) => u32::MAX,
        }
    }

    fn width(&self) -> usize {
        match self {
            Text::U16(_) => 2,
            Text::U32(_) => 4,
        }
    }
}

/// Unsigned integers of `width` bits each, packed into little-endian 64-bit words.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Packed {
    width: u32,
    len: usize,
    words: Vec<u64>,
}

impl Packed {
    /// The bits an integer up to `max` needs (at least one).
    pub(crate) fn bits_for(max: u64) -> u32 {
        (64 - max.leading_zeros()).max(1)
    }

    pub(crate) fn new(width: u32, values: impl ExactSizeIterator<Item = u64>) -> Packed {
        assert!((1..=64).contains(&width), "width in 1..=64 (callers use bits_for)");
        let len = values.len();
        // One spare word so `get` may always read the word after the one it starts in.
        let mut words = vec![0u64; (len * width as usize).div_ceil(64) + 1];
        for (i, v) in values.enumerate() {
            debug_assert!(width == 64 || v >> width == 0, "value fits the width");
            let bit = i * width as usize;
            let (w, off) = (bit / 64, (bit % 64) as u32);
            words[w] |= v << off;
            if off + width > 64 {
                words[w + 1] |= v >> (64 - off);
            }
        }
        Packed { width, len, words }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> u64 {
        debug_assert!(i < self.len);
        let bit = i * self.width as usize;
        let (w, off) = (bit / 64, (bit % 64) as u32);
        let lo = self.words[w] >> off;
        // `words` has a spare last word, so `w + 1` is always in bounds.
        let hi = if off == 0 { 0 } else { self.words[w + 1] << (64 - off) };
        let mask = if self.width == 64 { u64::MAX } else { (1u64 << self.width) - 1 };
        (lo | hi) & mask
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn from_bytes(width: u32, len: usize, bytes: &[u8]) -> Option<Packed> {
        if !(1..=64).contains(&width) {
            return None;
        }
        let words = (len.checked_mul(width as usize)?).div_ceil(64) + 1;
        if bytes.len() != words.checked_mul(8)? {
            return None;
        }
        let words = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8"))).collect();
        Some(Packed { width, len, words })
    }
}

/// Where an occurrence is: which document of the shard, and the token offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hit {
    pub doc: u32,
    pub offset: u32,
}

/// One immutable suffix-array index over a set of documents.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    text: Text,
    sa: Packed,
    starts: Packed,
    keys: Vec<DocKey>,
    /// For two-byte text, the first row of each token's suffixes (`firsts[t]..firsts[t + 1]`
    /// are the rows starting with `t`): rows are sorted by first token, so these are the
    /// prefix sums of the tokens' counts. A lookup starts inside its first token's rows
    /// instead of searching the whole array. Empty for four-byte text. Not stored: built
    /// in one pass over the text.
    firsts: Vec<u32>,
}

/// [`Shard::firsts`] of a text.
fn firsts(text: &Text) -> Vec<u32> {
    let Text::U16(t) = text else { return Vec::new() };
    let mut firsts = vec![0u32; 1 << 16 | 1];
    for &x in t {
        firsts[x as usize + 1] += 1;
    }
    // Prefix sums of counts: at most the text's length, below 2^31 (MAX_SHARD_POSITIONS).
    for i in 1..firsts.len() {
        firsts[i] += firsts[i - 1];
    }
    firsts
}

impl Shard {
    /// Builds a shard over `docs` (key, token ids). Token ids must be below `u32::MAX`;
    /// empty documents are kept (they can hold no match). Uses the machine's threads.
    pub fn build(docs: &[(DocKey, Vec<u32>)]) -> Result<Shard, Error> {
        let mut positions = 0usize;
        let mut max_token = 0u32;
        for (_, tokens) in docs {
            positions = positions
                .checked_add(tokens.len() + 1)
                .filter(|&p| p <= MAX_SHARD_POSITIONS)
                .ok_or_else(|| Error::Invalid(format!("a shard holds at most {MAX_SHARD_POSITIONS} positions (tokens plus one per document): split the documents")))?;
            if let Some(&m) = tokens.iter().max() {
                max_token = max_token.max(m);
            }
        }
        if max_token == u32::MAX {
            return Err(Error::Invalid(format!("token id {} is reserved as the document separator", u32::MAX)));
        }
        let mut starts = Vec::with_capacity(docs.len());
        let text = if max_token < u32::from(u16::MAX) {
            let mut t = Vec::with_capacity(positions);
            for (_, tokens) in docs {
                starts.push(t.len() as u64);
                t.push(u16::MAX);
                // Every id is below u16::MAX (checked above).
                t.extend(tokens.iter().map(|&x| x as u16));
            }
            Text::U16(t)
        } else {
            let mut t = Vec::with_capacity(positions);
            for (_, tokens) in docs {
                starts.push(t.len() as u64);
                t.push(u32::MAX);
                t.extend_from_slice(tokens);
            }
            Text::U32(t)
        };
        let sa = suffix_array(&text)?;
        let width = Packed::bits_for(text.len().saturating_sub(1) as u64);
        let sa = Packed::new(width, sa.into_iter().map(|p| p as u64));
        let starts = Packed::new(width, starts.into_iter());
        let firsts = firsts(&text);
        Ok(Shard { text, sa, starts, keys: docs.iter().map(|(k, _)| *k).collect(), firsts })
    }

    /// Token positions of the text (tokens plus one separator per document).
    pub fn positions(&self) -> usize {
        self.text.len()
    }

    /// Tokens of the documents (separators not counted).
    pub fn tokens(&self) -> usize {
        self.text.len() - self.keys.len()
    }

    pub fn docs(&self) -> usize {
        self.keys.len()
    }

    pub fn key(&self, doc: u32) -> &DocKey {
        &self.keys[doc as usize]
    }

    /// Bytes the index holds in memory (and on disk): text, suffix array, document map.
    pub fn bytes(&self) -> usize {
        self.text.len() * self.text.width() + self.sa.bytes() + self.starts.bytes() + self.keys.len() * 32
    }

    /// Bytes per stored token of the whole index.
    pub fn bytes_per_token(&self) -> f64 {
        self.bytes() as f64 / self.tokens().max(1) as f64
    }

    /// The token at a text position, or `None` past the end (which sorts first).
    #[inline]
    fn at(&self, pos: usize) -> Option<u32> {
        (pos < self.text.len()).then(|| self.text.get(pos))
    }

    /// Compares the suffix at `pos`, cut to `pattern.len()` tokens, with `pattern`.
    fn cmp_suffix(&self, pos: usize, pattern: &[u32]) -> Ordering {
        for (k, &p) in pattern.iter().enumerate() {
            match self.at(pos + k) {
                None => return Ordering::Less,
                Some(t) if t != p => return t.cmp(&p),
                Some(_) => {}
            }
        }
        Ordering::Equal
    }

    /// The suffix-array rows whose suffixes start with `pattern` (all rows for an empty
    /// one). A token id this shard cannot hold matches nothing.
    pub fn range(&self, pattern: &[u32]) -> Range<usize> {
        let n = self.sa.len();
        if pattern.iter().any(|&t| t >= self.text.separator()) {
            return 0..0;
        }
        if pattern.is_empty() {
            return 0..n;
        }
        let cmp = |row: usize| self.cmp_suffix(self.sa.get(row) as usize, pattern);
        let within = self.first_rows(pattern[0]).unwrap_or(0..n);
        let lo = self.partition(within.clone(), |row| cmp(row) == Ordering::Less);
        let hi = self.gallop(lo..within.end, |row| cmp(row) != Ordering::Greater);
        lo..hi
    }

    /// The rows whose suffixes start with `token`, from [`Shard::firsts`] (`None` for
    /// four-byte text).
    fn first_rows(&self, token: u32) -> Option<Range<usize>> {
        let t = token as usize;
        (t + 1 < self.firsts.len()).then(|| self.firsts[t] as usize..self.firsts[t + 1] as usize)
    }

    /// Narrows `rows` (whose suffixes share their first `depth` tokens) to those whose next
    /// token is `token`: a binary search for the first, a gallop from it for the end, each
    /// comparing one token (at depth 0 over every row, the first-token table).
    pub fn narrow(&self, rows: Range<usize>, depth: usize, token: u32) -> Range<usize> {
        if token >= self.text.separator() || rows.is_empty() {
            return rows.start..rows.start;
        }
        if depth == 0
            && rows == (0..self.sa.len())
            && let Some(first) = self.first_rows(token)
        {
            return first;
        }
        // Past the end sorts first: as `None < Some(_)`.
        let next = |row: usize| self.at(self.sa.get(row) as usize + depth);
        let lo = self.partition(rows.clone(), |row| next(row) < Some(token));
        let hi = self.gallop(lo..rows.end, |row| next(row) <= Some(token));
        lo..hi
    }

    /// [`Shard::partition`] for a prefix expected to be short (the rows of a match, which
    /// are few once a pattern is long, and none when a narrowing fails): probes 1, 2, 4, ...
    /// rows ahead, then searches the last step.
    fn gallop(&self, rows: Range<usize>, before: impl Fn(usize) -> bool) -> usize {
        let mut step = 1usize;
        let mut lo = rows.start;
        loop {
            let probe = lo.saturating_add(step - 1);
            if probe >= rows.end {
                return self.partition(lo..rows.end, &before);
            }
            if !before(probe) {
                return self.partition(lo..probe, &before);
            }
            lo = probe + 1;
            step = step.saturating_mul(2);
        }
    }

    /// The first row of `rows` for which `before` is false (`before` is true on a prefix).
    fn partition(&self, rows: Range<usize>, before: impl Fn(usize) -> bool) -> usize {
        let (mut lo, mut hi) = (rows.start, rows.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// How often `pattern` occurs (0 for an empty pattern).
    pub fn count(&self, pattern: &[u32]) -> u64 {
        if pattern.is_empty() {
            return 0;
        }
        self.range(pattern).len() as u64
    }

    /// For every start `i` of `query`, the length of the longest prefix of `query[i..]` that
    /// occurs in this shard.
    pub fn longest_matches(&self, query: &[u32]) -> Vec<usize> {
        let mut out = Vec::with_capacity(query.len());
        let mut prev = 0usize;
        for i in 0..query.len() {
            // query[i..i + prev - 1] is the tail of the previous match, so it occurs.
            let known = prev.saturating_sub(1);
            let mut rows = self.range(&query[i..i + known]);
            let mut len = known;
            while i + len < query.len() {
                let next = self.narrow(rows.clone(), len, query[i + len]);
                if next.is_empty() {
                    break;
                }
                rows = next;
                len += 1;
            }
            out.push(len);
            prev = len;
        }
        out
    }

    /// The document holding a text position, and the token offset in it (a separator's
    /// position reads as offset 0 of the document it starts).
    pub fn locate(&self, pos: usize) -> Hit {
        // The last document starting at or before `pos`; document 0 starts at 0 (checked
        // at build and load), so the partition point is at least 1 for any position.
        let doc = self.partition(0..self.starts.len(), |d| self.starts.get(d) as usize <= pos).saturating_sub(1);
        let offset = pos.saturating_sub(self.starts.get(doc) as usize + 1);
        Hit { doc: doc as u32, offset: offset as u32 }
    }

    /// Where the rows' suffixes start, at most `limit` of them, in row order. A row whose
    /// suffix starts at a separator (only an empty pattern's rows hold one) is left out.
    pub fn hits(&self, rows: Range<usize>, limit: usize) -> Vec<Hit> {
        let sep = self.text.separator();
        rows.map(|row| self.sa.get(row) as usize)
            .filter(|&pos| self.text.get(pos) != sep)
            .take(limit)
            .map(|pos| self.locate(pos))
            .collect()
    }

    /// A document's tokens.
    pub fn doc_tokens(&self, doc: u32) -> Vec<u32> {
        let d = doc as usize;
        let start = self.starts.get(d) as usize + 1;
        let end = if d + 1 < self.starts.len() { self.starts.get(d + 1) as usize } else { self.text.len() };
        (start..end).map(|p| self.text.get(p)).collect()
    }

    /// Writes the shard into `dir` (created; must not exist), files first, the manifest
    /// last, each synced, so a shard directory with a `shard.json` is complete.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir(dir).map_err(|e| Error::io(dir, e))?;
        // Little-endian whatever the host, as `load` reads it.
        let text: Vec<u8> = match &self.text {
            Text::U16(t) => t.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Text::U32(t) => t.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        write_synced(&dir.join("text.bin"), &text)?;
        write_synced(&dir.join("sa.bin"), &self.sa.to_bytes())?;
        write_synced(&dir.join("starts.bin"), &self.starts.to_bytes())?;
        write_synced(&dir.join("keys.bin"), &self.keys.concat())?;
        let meta = ShardMeta {
            format: FORMAT_VERSION,
            token_width: self.text.width() as u32,
            positions: self.text.len() as u64,
            docs: self.keys.len() as u64,
            pointer_bits: self.sa.width,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Internal(e.to_string()))?;
        write_synced(&dir.join("shard.json"), &json)?;
        sync_dir(dir)
    }

    /// Reads a shard [`Shard::save`] wrote, checking every file's size against its manifest.
    pub fn load(dir: &Path) -> Result<Shard, Error> {
        let corrupt = |what: &str| Error::Corrupt(format!("{}: {what}", dir.display()));
        let meta: ShardMeta = serde_json::from_slice(&read(&dir.join("shard.json"))?)
            .map_err(|e| corrupt(&format!("shard.json: {e}")))?;
        if meta.format != FORMAT_VERSION {
            return Err(corrupt(&format!("format {} (this build reads {FORMAT_VERSION})", meta.format)));
        }
        let positions = usize::try_from(meta.positions).map_err(|_| corrupt("positions"))?;
        let docs = usize::try_from(meta.docs).map_err(|_| corrupt("docs"))?;
        if positions > MAX_SHARD_POSITIONS || docs > positions || (docs == 0) != (positions == 0) {
            return Err(corrupt("positions and documents disagree"));
        }
        if meta.pointer_bits != Packed::bits_for(positions.saturating_sub(1) as u64) {
            return Err(corrupt("pointer width does not match the length"));
        }
        let bytes = read(&dir.join("text.bin"))?;
        let text = match meta.token_width {
            2 if bytes.len() == positions * 2 => {
                Text::U16(bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
            }
            4 if bytes.len() == positions * 4 => Text::U32(
                bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4"))).collect(),
            ),
            _ => return Err(corrupt("text.bin does not match its token width and length")),
        };
        drop(bytes);
        let sa = Packed::from_bytes(meta.pointer_bits, positions, &read(&dir.join("sa.bin"))?)
            .ok_or_else(|| corrupt("sa.bin has the wrong size"))?;
        let starts = Packed::from_bytes(meta.pointer_bits, docs, &read(&dir.join("starts.bin"))?)
            .ok_or_else(|| corrupt("starts.bin has the wrong size"))?;
        let keys = read(&dir.join("keys.bin"))?;
        if keys.len() != docs * 32 {
            return Err(corrupt("keys.bin has the wrong size"));
        }
        let keys = keys.chunks_exact(32).map(|c| c.try_into().expect("chunks of 32")).collect();
        let firsts = firsts(&text);
        let shard = Shard { text, sa, starts, keys, firsts };
        // Structural checks, so a damaged file fails here and not as a wrong answer or a
        // panic later: document 0 starts at 0, starts increase, each holds a separator, and
        // every pointer is in range (one pass over the suffix array).
        let sep = shard.text.separator();
        let starts_ok = (0..docs).all(|d| {
            let s = shard.starts.get(d) as usize;
            let increasing = d == 0 || shard.starts.get(d - 1) < shard.starts.get(d);
            s < positions && shard.text.get(s) == sep && (d > 0 || s == 0) && increasing
        });
        if !starts_ok || (0..positions).any(|r| shard.sa.get(r) as usize >= positions) {
            return Err(corrupt("the document map or suffix array is inconsistent"));
        }
        Ok(shard)
    }
}

#[derive(Serialize, Deserialize)]
struct ShardMeta {
    format: u32,
    token_width: u32,
    positions: u64,
    docs: u64,
    pointer_bits: u32,
}

/// The suffix array of `text` by induced sorting (`libsais`, on every OpenMP thread).
fn suffix_array(text: &Text) -> Result<Vec<i32>, Error> {
    use libsais::{SuffixArrayConstruction, ThreadCount};
    let failed = |e: libsais::LibsaisError| Error::Internal(format!("suffix array construction: {e:?}"));
    if text.len() == 0 {
        return Ok(Vec::new());
    }
    match text {
        Text::U16(t) => Ok(SuffixArrayConstruction::for_text(t.as_slice())
            .in_owned_buffer32()
            .multi_threaded(ThreadCount::openmp_default())
            .run()
            .map_err(failed)?
            .into_vec()),
        Text::U32(t) => {
            // libsais' integer alphabet is i32 and uses the text as scratch: a dense copy that
            // keeps the order (ids are remapped to their ranks, the separator stays largest).
            let mut ids: Vec<u32> = t.clone();
            ids.sort_unstable();
            ids.dedup();
            let mut ranked: Vec<i32> = t
                .iter()
                .map(|x| ids.binary_search(x).expect("every id is in the sorted set") as i32)
                .collect();
            Ok(SuffixArrayConstruction::for_text_mut(ranked.as_mut_slice())
                .in_owned_buffer()
                .multi_threaded(ThreadCount::openmp_default())
                .run()
                .map_err(failed)?
                .into_vec())
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Documents from infini-gram's tokenized layout (`tokenized.N`): two-byte little-endian
/// token ids, each document preceded by `0xFFFF`. Keys are the documents' ordinals (as a
/// little-endian u64 in the key's first 8 bytes).
pub fn parse_tokenized(bytes: &[u8]) -> Result<Vec<(DocKey, Vec<u32>)>, Error> {
    if bytes.len() % 2 != 0 {
        return Err(Error::Invalid("a tokenized file holds two-byte tokens: its length is odd".into()));
    }
    let mut docs: Vec<(DocKey, Vec<u32>)> = Vec::new();
    for (i, c) in bytes.chunks_exact(2).enumerate() {
        let t = u16::from_le_bytes([c[0], c[1]]);
        if t == u16::MAX {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(docs.len() as u64).to_le_bytes());
            docs.push((key, Vec::new()));
        } else if let Some((_, doc)) = docs.last_mut() {
            doc.push(u32::from(t));
        } else {
            return Err(Error::Invalid(format!("token {i} comes before the first document separator 0xFFFF")));
        }
    }
    Ok(docs)
}

/// A maximal matching span of an output: `len` tokens from `start` occur in the index,
/// and the span is neither extendable to the right nor contained in another match.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    /// Occurrences in the whole index.
    pub count: u64,
    /// Sum over its tokens of log(count of the token / tokens in the index): the lower,
    /// the rarer (OLMoTrace's span unigram probability).
    pub unigram_logprob: f64,
}

/// A directory of shards and the manifest naming them (`spans.json`). Shards are added
/// whole and never changed; a merge writes the merged shard, then the manifest, then
/// deletes the merged ones, so a crash at any point leaves a readable index (at worst an
/// orphan directory, which the next `open` removes).
pub struct SpanIndex {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<Shard>,
    /// The exclusive lock on `dir/lock`, held while this value lives: one process at a
    /// time adds, merges or removes leftovers.
    _lock: std::fs::File,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Shard directory names, oldest first, with what each covers.
    pub shards: Vec<ShardEntry>,
    /// The next shard number.
    pub next: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub dir: String,
    /// Caller-chosen labels of what the shard covers (for contributions: `datanet@from..to`).
    pub covers: Vec<String>,
    pub tokens: u64,
    pub docs: u64,
}

impl SpanIndex {
    /// Opens (or creates) the index in `dir`, locking it for this process, and loads its
    /// shards. An index another process holds is refused (the caller's: stop the other
    /// writer, such as `up`'s attribution job, first).
    pub fn open(dir: &Path) -> Result<SpanIndex, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Invalid(format!(
                    "the span index {} is in use by another process (up's attribution job?)",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let path = dir.join("spans.json");
        let manifest: Manifest = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        // Directories the manifest does not name are leftovers of an interrupted add or merge.
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("shard-") && !manifest.shards.iter().any(|s| s.dir == name) {
                std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(&entry.path(), e))?;
            }
        }
        let shards = manifest.shards.iter().map(|s| Shard::load(&dir.join(&s.dir))).collect::<Result<_, _>>()?;
        Ok(SpanIndex { dir: dir.to_owned(), manifest, shards, _lock: lock })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Labels of everything the index covers.
    pub fn covers(&self) -> impl Iterator<Item = &str> {
        self.manifest.shards.iter().flat_map(|s| s.covers.iter().map(String::as_str))
    }

    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tokens() as u64).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes() as u64).sum()
    }

    /// Builds a shard over `docs` and adds it, labelled `covers`. Nothing else changes.
    pub fn add(&mut self, docs: &[(DocKey, Vec<u32>)], covers: Vec<String>) -> Result<(), Error> {
        let shard = Shard::build(docs)?;
        self.install(shard, covers, &[])
    }

    /// Merges every shard into one (when there are two or more).
    pub fn merge(&mut self) -> Result<(), Error> {
        if self.shards.len() < 2 {
            return Ok(());
        }
        let mut docs = Vec::new();
        for shard in &self.shards {
            for d in 0..shard.docs() as u32 {
                docs.push((*shard.key(d), shard.doc_tokens(d)));
            }
        }
        let shard = Shard::build(&docs)?;
        drop(docs);
        let covers = self.covers().map(str::to_owned).collect();
        let old: Vec<String> = self.manifest.shards.iter().map(|s| s.dir.clone()).collect();
        self.install(shard, covers, &old)
    }

    /// Saves `shard`, then writes the manifest with it in place of `replaces`, then removes
    /// the replaced directories.
    fn install(&mut self, shard: Shard, covers: Vec<String>, replaces: &[String]) -> Result<(), Error> {
        let name = format!("shard-{:06}", self.manifest.next);
        shard.save(&self.dir.join(&name))?;
        let mut manifest = self.manifest.clone();
        manifest.next += 1;
        manifest.shards.retain(|s| !replaces.contains(&s.dir));
        manifest.shards.push(ShardEntry { dir: name, covers, tokens: shard.tokens() as u64, docs: shard.docs() as u64 });
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
        let tmp = self.dir.join("spans.json.tmp");
        write_synced(&tmp, &json)?;
        let path = self.dir.join("spans.json");
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.dir)?;
        let mut kept: Vec<Shard> = Vec::with_capacity(manifest.shards.len());
        for (entry, old) in self.manifest.shards.iter().zip(std::mem::take(&mut self.shards)) {
            if replaces.contains(&entry.dir) {
                let path = self.dir.join(&entry.dir);
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            } else {
                kept.push(old);
            }
        }
        kept.push(shard);
        self.shards = kept;
        self.manifest = manifest;
        Ok(())
    }

    /// Occurrences of `pattern` in every shard.
    pub fn count(&self, pattern: &[u32]) -> u64 {
        self.shards.iter().map(|s| s.count(pattern)).sum()
    }

    /// For every start of `query`, the longest prefix found in any shard.
    pub fn longest_matches(&self, query: &[u32]) -> Vec<usize> {
        let mut best = vec![0usize; query.len()];
        for shard in &self.shards {
            for (b, l) in best.iter_mut().zip(shard.longest_matches(query)) {
                *b = (*b).max(l);
            }
        }
        best
    }

    /// The maximal matching spans of `query` at least `min_len` tokens long, in order.
    pub fn maximal_spans(&self, query: &[u32], min_len: usize) -> Vec<Span> {
        let longest = self.longest_matches(query);
        let total = self.tokens().max(1) as f64;
        let mut unigram = std::collections::HashMap::new();
        let mut spans = Vec::new();
        for (i, &len) in longest.iter().enumerate() {
            // A match one shorter than its left neighbour's is that match's tail.
            let contained = i > 0 && len + 1 == longest[i - 1];
            if len == 0 || len < min_len || contained {
                continue;
            }
            let tokens = &query[i..i + len];
            let unigram_logprob = tokens
                .iter()
                .map(|t| *unigram.entry(*t).or_insert_with(|| (self.count(&[*t]).max(1) as f64 / total).ln()))
                .sum();
            spans.push(Span { start: i, len, count: self.count(tokens), unigram_logprob });
        }
        spans
    }

    /// Where `pattern` occurs: (shard, hit), at most `limit`, shard by shard (none for an
    /// empty pattern).
    pub fn hits(&self, pattern: &[u32], limit: usize) -> Vec<(usize, Hit)> {
        let mut out = Vec::new();
        if pattern.is_empty() {
            return out;
        }
        for (s, shard) in self.shards.iter().enumerate() {
            if out.len() >= limit {
                break;
            }
            let rows = shard.range(pattern);
            out.extend(shard.hits(rows, limit - out.len()).into_iter().map(|h| (s, h)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_round_trips_every_width() {
        for width in [1u32, 5, 27, 31, 33, 63, 64] {
            let mask = if width == 64 { u64::MAX } else { (1 << width) - 1 };
            let values: Vec<u64> = (0..300u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) & mask).collect();
            let p = Packed::new(width, values.iter().copied());
            let got: Vec<u64> = (0..values.len()).map(|i| p.get(i)).collect();
            assert_eq!(got, values, "width {width}");
            let back = Packed::from_bytes(width, values.len(), &p.to_bytes()).unwrap();
            assert_eq!(back, p);
        }
    }

    #[test]
    fn rows_are_sorted_suffixes() {
        let docs = vec![([1; 32], vec![3, 1, 3, 1, 2]), ([2; 32], vec![]), ([3; 32], vec![1, 3, 1])];
        let shard = Shard::build(&docs).unwrap();
        for row in 1..shard.positions() {
            let a: Vec<u32> = (shard.sa.get(row - 1) as usize..shard.positions()).map(|p| shard.text.get(p)).collect();
            let b: Vec<u32> = (shard.sa.get(row) as usize..shard.positions()).map(|p| shard.text.get(p)).collect();
            assert!(a < b, "{a:?} < {b:?}");
        }
    }

    #[test]
    fn galloping_finds_the_same_boundary_as_bisection() {
        let shard = Shard::build(&[([1; 32], vec![1, 2, 3])]).unwrap();
        for start in 0..20usize {
            for end in start..60 {
                for cut in start..=end {
                    let before = |row: usize| row < cut;
                    assert_eq!(shard.gallop(start..end, before), shard.partition(start..end, before), "{start}..{end} cut {cut}");
                    assert_eq!(shard.gallop(start..end, before), cut);
                }
            }
        }
    }

    #[test]
    fn first_token_rows_are_exactly_the_rows_starting_with_it() {
        let docs = vec![([1; 32], vec![3, 1, 3, 1, 2, 0xFFFE]), ([2; 32], vec![]), ([3; 32], vec![1, 3, 1, 0])];
        let shard = Shard::build(&docs).unwrap();
        for token in [0u32, 1, 2, 3, 4, 0xFFFE, 0xFFFF] {
            let expected: Vec<usize> = (0..shard.positions()).filter(|&r| shard.text.get(shard.sa.get(r) as usize) == token).collect();
            let rows = shard.first_rows(token).unwrap();
            assert_eq!(rows.clone().collect::<Vec<_>>(), expected, "token {token}");
            if token < 0xFFFF {
                assert_eq!(shard.narrow(0..shard.positions(), 0, token), rows);
            }
        }
        assert!(shard.first_rows(0x1_0000).is_none());
        let wide = Shard::build(&[([1; 32], vec![70_000, 1])]).unwrap();
        assert!(wide.first_rows(1).is_none(), "four-byte text searches the whole array");
        assert_eq!(wide.count(&[1]), 1);
    }
}
