//! The span index against brute force: counts, longest matches, maximal spans, positions,
//! persistence and the shard lifecycle.

use ledgerlake_attribution::spans::{DocKey, Shard, SpanIndex, parse_tokenized};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn key(i: usize) -> DocKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k
}

fn corpus(rng: &mut StdRng, docs: usize, vocab: u32, max_len: usize) -> Vec<(DocKey, Vec<u32>)> {
    (0..docs)
        .map(|d| {
            let len = rng.random_range(0..=max_len);
            (key(d), (0..len).map(|_| rng.random_range(0..vocab)).collect())
        })
        .collect()
}

/// Occurrences of `pattern` inside documents (never across two), by scanning.
fn brute_count(docs: &[(DocKey, Vec<u32>)], pattern: &[u32]) -> u64 {
    docs.iter()
        .map(|(_, t)| if t.len() < pattern.len() { 0 } else { t.windows(pattern.len()).filter(|w| *w == pattern).count() as u64 })
        .sum()
}

fn brute_longest(docs: &[(DocKey, Vec<u32>)], query: &[u32]) -> Vec<usize> {
    (0..query.len())
        .map(|i| (0..=query.len() - i).rev().find(|&l| l == 0 || brute_count(docs, &query[i..i + l]) > 0).unwrap())
        .collect()
}

fn random_queries(rng: &mut StdRng, docs: &[(DocKey, Vec<u32>)], vocab: u32, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|q| {
            let len = rng.random_range(1..6);
            let present = docs.iter().filter(|(_, t)| t.len() >= len).count() > 0 && q % 2 == 0;
            if present {
                // A slice of a document: present at least once.
                loop {
                    let (_, t) = &docs[rng.random_range(0..docs.len())];
                    if t.len() >= len {
                        let s = rng.random_range(0..=t.len() - len);
                        return t[s..s + len].to_vec();
                    }
                }
            }
            (0..len).map(|_| rng.random_range(0..vocab)).collect()
        })
        .collect()
}

#[test]
fn counts_equal_brute_force_for_two_and_four_byte_tokens() {
    let mut rng = StdRng::seed_from_u64(7);
    for (vocab, wide) in [(5u32, false), (40, false), (70_000, true)] {
        let mut docs = corpus(&mut rng, 60, vocab, 40);
        if wide {
            // Ids above 0xFFFF force four-byte tokens.
            docs[0].1.push(70_000);
        }
        let shard = Shard::build(&docs).unwrap();
        assert_eq!(shard.tokens(), docs.iter().map(|(_, t)| t.len()).sum::<usize>());
        for q in random_queries(&mut rng, &docs, vocab + 1, 400) {
            assert_eq!(shard.count(&q), brute_count(&docs, &q), "vocab {vocab}, query {q:?}");
        }
    }
}

#[test]
fn no_ngram_crosses_a_document_and_the_separator_matches_nothing() {
    let docs = vec![(key(0), vec![1, 2]), (key(1), vec![3, 4])];
    let shard = Shard::build(&docs).unwrap();
    assert_eq!(shard.count(&[2, 3]), 0, "the end of one document and the start of the next");
    assert_eq!(shard.count(&[1, 2]), 1);
    assert_eq!(shard.count(&[0xFFFF]), 0, "the separator is not a token");
    assert_eq!(shard.count(&[u32::MAX]), 0);
    assert_eq!(shard.count(&[]), 0);
}

#[test]
fn longest_matches_equal_brute_force() {
    let mut rng = StdRng::seed_from_u64(11);
    let docs = corpus(&mut rng, 40, 6, 30);
    let shard = Shard::build(&docs).unwrap();
    for _ in 0..50 {
        // Outputs that copy pieces of documents between random tokens.
        let mut query = Vec::new();
        while query.len() < 40 {
            if rng.random_bool(0.5) {
                let (_, t) = &docs[rng.random_range(0..docs.len())];
                if !t.is_empty() {
                    let s = rng.random_range(0..t.len());
                    let e = rng.random_range(s..=t.len());
                    query.extend_from_slice(&t[s..e]);
                }
            } else {
                query.push(rng.random_range(0..8));
            }
        }
        assert_eq!(shard.longest_matches(&query), brute_longest(&docs, &query), "{query:?}");
    }
}

#[test]
fn hits_name_the_documents_and_offsets_that_hold_the_pattern() {
    let mut rng = StdRng::seed_from_u64(3);
    let docs = corpus(&mut rng, 30, 4, 25);
    let shard = Shard::build(&docs).unwrap();
    for q in random_queries(&mut rng, &docs, 4, 100) {
        let mut got: Vec<(DocKey, u32)> =
            shard.hits(shard.range(&q), usize::MAX).into_iter().map(|h| (*shard.key(h.doc), h.offset)).collect();
        got.sort();
        let mut want = Vec::new();
        for (k, t) in &docs {
            for o in 0..t.len().saturating_sub(q.len() - 1) {
                if t[o..o + q.len()] == q[..] {
                    want.push((*k, o as u32));
                }
            }
        }
        want.sort();
        assert_eq!(got, want, "{q:?}");
    }
    for d in 0..docs.len() as u32 {
        assert_eq!(shard.doc_tokens(d), docs[d as usize].1);
    }
}

#[test]
fn maximal_spans_are_the_matches_no_other_contains() {
    let canary: Vec<u32> = (100..120).collect();
    let mut rng = StdRng::seed_from_u64(5);
    let mut docs = corpus(&mut rng, 20, 50, 30);
    let mut planted = docs[7].1.clone();
    planted.splice(3..3, canary.iter().copied());
    docs[7].1 = planted;
    let dir = tempfile::tempdir().unwrap();
    let mut index = SpanIndex::open(dir.path()).unwrap();
    index.add(&docs, vec!["d@0..1".into()]).unwrap();
    // An output: noise, the canary, noise.
    let mut output = vec![60, 61, 62];
    output.extend_from_slice(&canary);
    output.extend([63, 64]);
    let spans = index.maximal_spans(&output, 5);
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!((spans[0].start, spans[0].len, spans[0].count), (3, 20, 1));
    let hits = index.hits(&output[3..23], 10);
    assert_eq!(hits.len(), 1);
    assert_eq!(index.shards()[hits[0].0].key(hits[0].1.doc), &key(7));
    assert_eq!(hits[0].1.offset, 3);
    // Every maximal span is a longest match that is not the tail of its left neighbour.
    let longest = index.longest_matches(&output);
    for s in index.maximal_spans(&output, 1) {
        assert_eq!(longest[s.start], s.len);
        assert!(s.start == 0 || longest[s.start - 1] != s.len + 1);
        assert!(s.unigram_logprob <= 0.0);
    }
}

#[test]
fn a_saved_shard_loads_equal_and_a_damaged_one_is_refused() {
    let mut rng = StdRng::seed_from_u64(9);
    let docs = corpus(&mut rng, 50, 1000, 60);
    let shard = Shard::build(&docs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    shard.save(&path).unwrap();
    assert_eq!(Shard::load(&path).unwrap(), shard);
    // Bytes per token: two for the token, the packed pointer, the document map.
    assert!(shard.bytes_per_token() < 2.0 + 8.0 * 34.0 / 25.0 + 1.0, "{}", shard.bytes_per_token());
    let sa = path.join("sa.bin");
    let mut bytes = std::fs::read(&sa).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&sa, &bytes).unwrap();
    let err = Shard::load(&path).unwrap_err();
    assert!(err.to_string().contains("sa.bin"), "{err}");
}

#[test]
fn shards_add_up_merge_into_one_and_survive_a_reopen() {
    let mut rng = StdRng::seed_from_u64(13);
    let a = corpus(&mut rng, 30, 8, 30);
    let b: Vec<_> = corpus(&mut rng, 30, 8, 30).into_iter().enumerate().map(|(i, (_, t))| (key(1000 + i), t)).collect();
    let all: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
    let dir = tempfile::tempdir().unwrap();
    let mut index = SpanIndex::open(dir.path()).unwrap();
    index.add(&a, vec!["d@0..3".into()]).unwrap();
    index.add(&b, vec!["d@3..5".into()]).unwrap();
    assert_eq!(index.shards().len(), 2);
    let queries = random_queries(&mut rng, &all, 8, 200);
    for q in &queries {
        assert_eq!(index.count(q), brute_count(&all, q), "{q:?}");
    }
    let longest_before: Vec<_> = queries.iter().map(|q| index.longest_matches(q)).collect();
    // One process at a time.
    let err = SpanIndex::open(dir.path()).err().unwrap();
    assert!(err.is_caller() && err.to_string().contains("in use"), "{err}");
    drop(index);
    // A leftover directory of an interrupted add is removed at open.
    std::fs::create_dir(dir.path().join("shard-999999")).unwrap();
    let mut index = SpanIndex::open(dir.path()).unwrap();
    assert!(!dir.path().join("shard-999999").exists());
    index.merge().unwrap();
    assert_eq!(index.shards().len(), 1);
    assert_eq!(index.covers().collect::<Vec<_>>(), ["d@0..3", "d@3..5"]);
    drop(index);
    let index = SpanIndex::open(dir.path()).unwrap();
    assert_eq!(index.shards().len(), 1);
    assert_eq!(index.tokens(), all.iter().map(|(_, t)| t.len() as u64).sum::<u64>());
    for (q, before) in queries.iter().zip(longest_before) {
        assert_eq!(index.count(q), brute_count(&all, q));
        assert_eq!(index.longest_matches(q), before);
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(index.hits(&[], 10).is_empty(), "an empty pattern is nowhere");
    assert_eq!(names.iter().filter(|n| n.to_string_lossy().starts_with("shard-")).count(), 1, "{names:?}");
}

#[test]
fn a_token_id_reserved_for_the_separator_is_refused() {
    let err = Shard::build(&[(key(0), vec![1, u32::MAX])]).unwrap_err();
    assert!(err.is_caller() && err.to_string().contains("separator"), "{err}");
}

#[test]
fn infini_gram_tokenized_files_parse_into_their_documents() {
    let bytes: Vec<u8> = [0xFFFFu16, 5, 6, 0xFFFF, 0xFFFF, 7].iter().flat_map(|t| t.to_le_bytes()).collect();
    let docs = parse_tokenized(&bytes).unwrap();
    let tokens: Vec<_> = docs.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(tokens, [vec![5, 6], vec![], vec![7]]);
    assert_eq!(docs[2].0, key(2));
    assert!(parse_tokenized(&bytes[2..]).unwrap_err().to_string().contains("before the first"));
    assert!(parse_tokenized(&bytes[..3]).unwrap_err().is_caller());
}
