//! The span attribution job on a real lake: approved contributions indexed incrementally,
//! every pending inference attributed once, flagged contributions earning nothing,
//! weights summing to exactly the scale.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use ledgerlake_attribution::job::{self, Pending};
use ledgerlake_attribution::{SpanIndex, SpanRule, WEIGHT_SCALE};
use ledgerlake_lakehouse::events::{
    self, ContributionReviewed, ContributionSubmitted, DatanetCreated, Event, InferenceAttributed, InferenceTokens, Verdict,
};
use ledgerlake_lakehouse::lake::TableWriter;
use ledgerlake_lakehouse::{Address, ContributionId, Lake, LakeConfig, Sha256Hex, messages};

pub(crate) fn addr(n: u8) -> Address {
    format!("0x{}", format!("{n:02x}").repeat(20)).parse().unwrap()
}

pub(crate) fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 10, minute, 0).unwrap()
}

pub(crate) fn signature() -> ledgerlake_lakehouse::Signature {
    format!("0x{}1b", "11".repeat(64)).parse().unwrap()
}

pub(crate) fn contribution_id(content: &str) -> ContributionId {
    ContributionId::for_message(&messages::contribution(&"facts".parse().unwrap(), &Sha256Hex::digest(content.as_bytes())))
}

/// A word-level test tokenizer: each word's FNV-1a hash, below 60,000.
pub(crate) fn tokenize(text: &str) -> Result<Vec<u32>, String> {
    Ok(text
        .split_whitespace()
        .map(|w| (w.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))) % 60_000)
        .collect())
}

pub(crate) async fn commit(lake: &Lake, events: Vec<Event>) {
    let kind = events[0].kind();
    let mut writer = TableWriter::open(lake, kind).await.unwrap();
    let batch = events::to_record_batch(kind, events.iter(), Utc::now()).unwrap();
    writer.append(&[batch]).await.unwrap();
}

pub(crate) const CANARY: &str = "the violet harbour of quessant opens only on the third tide of winter";
pub(crate) const SECOND: &str = "glass lanterns in tavrin are lit with oil pressed from blue olives every dusk";
pub(crate) const THIRD: &str = "the tavrin council meets under a roof of woven copper reeds each spring";
pub(crate) const FLAGGED: &str = "a forged ledger claims the marquis owned eleven silver mills near ostrava";

pub(crate) async fn contributions(lake: &Lake, texts: &[(&str, u8, Verdict)]) {
    commit(
        lake,
        vec![
            DatanetCreated {
                event_id: "create-facts".parse().unwrap(),
                event_time: at(0),
                datanet_id: "facts".parse().unwrap(),
                owner: addr(1),
                name: "facts".into(),
                description: String::new(),
                license: "CC-BY-4.0".into(),
                visibility: None,
                signature: None,
            }
            .into(),
        ],
    )
    .await;
    let submitted = texts
        .iter()
        .enumerate()
        .map(|(i, (text, who, _))| {
            let content = format!("{text} . filler words about nothing {i}");
            ContributionSubmitted {
                event_id: format!("sub-{i}").parse().unwrap(),
                event_time: at(1),
                contribution_id: Some(contribution_id(&content)),
                datanet_id: "facts".parse().unwrap(),
                contributor: addr(*who),
                content: content.clone(),
                content_sha256: Some(Sha256Hex::digest(content.as_bytes())),
                license: "CC-BY-4.0".into(),
                language: None,
                source: None,
                tags: vec![],
                signature: signature(),
            }
            .into()
        })
        .collect();
    commit(lake, submitted).await;
    let reviews = texts
        .iter()
        .enumerate()
        .map(|(i, (text, _, verdict))| {
            ContributionReviewed {
                event_id: format!("rev-{i}").parse().unwrap(),
                event_time: at(2),
                contribution_id: contribution_id(&format!("{text} . filler words about nothing {i}")),
                datanet_id: "facts".parse().unwrap(),
                reviewer: addr(1),
                verdict: *verdict,
                reason: None,
                signature: signature(),
            }
            .into()
        })
        .collect();
    commit(lake, reviews).await;
}

pub(crate) fn tokens(id: &str, output: &str) -> Event {
    InferenceTokens {
        event_id: format!("{id}:tokens").parse().unwrap(),
        event_time: at(5),
        inference_id: id.parse().unwrap(),
        model_id: "ledgerlake-base".parse().unwrap(),
        prompt_token_ids: vec![1, 2],
        output_token_ids: tokenize(output).unwrap(),
    }
    .into()
}

pub(crate) fn rows(events: &[Event]) -> Vec<&InferenceAttributed> {
    events.iter().map(|e| if let Event::InferenceAttributed(a) = e { a } else { panic!("kind") }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pending_inference_is_attributed_once_and_flagged_contributions_earn_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    let texts = [(CANARY, 2, Verdict::Approved), (SECOND, 3, Verdict::Approved), (THIRD, 4, Verdict::Approved), (FLAGGED, 5, Verdict::Flagged)];
    contributions(&lake, &texts).await;
    commit(
        &lake,
        vec![
            tokens("inf-canary", &format!("well , {CANARY} , they say")),
            tokens("inf-flagged", &format!("I read that {FLAGGED} once")),
            tokens("inf-two", &format!("{SECOND} and also {THIRD}")),
            tokens("inf-none", "nothing here matches anything at all in any contribution"),
        ],
    )
    .await;

    let (approved, reviewed) = job::approved(&lake).await.unwrap();
    assert_eq!(approved.len(), 3, "the flagged contribution is not approved");
    let mut index = SpanIndex::open(&dir.path().join("spans")).unwrap();
    assert_eq!(job::index_new(&mut index, &approved, reviewed, &tokenize).unwrap(), 3);
    assert_eq!(job::index_new(&mut index, &approved, reviewed, &tokenize).unwrap(), 0, "incremental");

    let (pending, version) = job::pending(&lake, 100).await.unwrap();
    assert_eq!(pending.iter().map(|p| p.inference_id.as_str()).collect::<Vec<_>>(), ["inf-canary", "inf-flagged", "inf-none", "inf-two"], "by time, then id");
    let rule = SpanRule::default();
    let basis = format!("inference_tokens@{version}");
    let mut by_inference: HashMap<String, Vec<Event>> = HashMap::new();
    for p in &pending {
        by_inference.insert(p.inference_id.to_string(), job::attribute_spans(&index, &approved, &rule, p, &basis).unwrap());
    }
    let canary = rows(&by_inference["inf-canary"]);
    assert_eq!(canary.len(), 1);
    assert_eq!(canary[0].weight, WEIGHT_SCALE, "a reproduced canary puts all its weight on its contribution");
    assert_eq!(canary[0].contributor, Some(addr(2)));
    assert_eq!(canary[0].datanet_id.as_ref().map(|d| d.as_str()), Some("facts"));
    assert_eq!(canary[0].spans.len(), 1);
    assert_eq!((canary[0].spans[0].start, canary[0].spans[0].len), (2, 13), "the canary's 13 words after 'well ,'");
    for id in ["inf-flagged", "inf-none"] {
        let r = rows(&by_inference[id]);
        assert_eq!((r.len(), r[0].contribution_id.is_none(), r[0].weight), (1, true, 0), "{id} is unattributed");
    }
    let two = rows(&by_inference["inf-two"]);
    assert_eq!(two.len(), 2);
    assert_eq!(two.iter().map(|r| r.weight).sum::<u64>(), WEIGHT_SCALE);
    assert!(two.iter().all(|r| r.weight > WEIGHT_SCALE / 4 && r.raw_score > 0.0));
    let mut who: Vec<_> = two.iter().map(|r| r.contributor.unwrap()).collect();
    who.sort();
    assert_eq!(who, [addr(3), addr(4)]);

    // Stored, they are not pending any more; the same run again makes the same event ids.
    let again = job::attribute_spans(&index, &approved, &rule, &pending[0], &basis).unwrap();
    assert_eq!(again[0].event_id(), by_inference["inf-canary"][0].event_id());
    commit(&lake, by_inference.into_values().flatten().collect()).await;
    let (left, _) = job::pending(&lake, 100).await.unwrap();
    assert_eq!(left, Vec::<Pending>::new());
}
