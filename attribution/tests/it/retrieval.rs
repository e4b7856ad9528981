//! Retrieval on a real lake: BM25 over the approved contributions of public datanets, kept
//! in step with reviews and visibility, and the job paying cited contributions by relevance.

use std::collections::HashMap;

use ledgerlake_attribution::job;
use ledgerlake_attribution::retrieval::{self, RetrievalIndex};
use ledgerlake_attribution::{Mix, WEIGHT_SCALE};
use ledgerlake_lakehouse::events::{AttributionMethod, ContributionReviewed, DatanetUpdated, InferenceCited, Verdict, Visibility};
use ledgerlake_lakehouse::{DatanetId, Lake, LakeConfig};

use crate::job::{CANARY, FLAGGED, SECOND, THIRD, addr, at, commit, contribution_id, contributions, rows, signature, tokens};

fn id_of(i: usize, text: &str) -> ledgerlake_lakehouse::ContributionId {
    contribution_id(&format!("{text} . filler words about nothing {i}"))
}

fn facts() -> Vec<DatanetId> {
    vec!["facts".parse().unwrap()]
}

async fn publish(lake: &Lake, visibility: Visibility, n: u32) {
    commit(
        lake,
        vec![
            DatanetUpdated {
                event_id: format!("vis-{n}").parse().unwrap(),
                event_time: at(3 + n),
                datanet_id: "facts".parse().unwrap(),
                updated_by: addr(1),
                name: None,
                description: None,
                license: None,
                status: None,
                visibility: Some(visibility),
                signature: None,
            }
            .into(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieval_finds_public_approved_chunks_and_follows_reviews_and_visibility() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    let texts = [(CANARY, 2, Verdict::Approved), (SECOND, 3, Verdict::Approved), (THIRD, 4, Verdict::Approved), (FLAGGED, 5, Verdict::Flagged)];
    contributions(&lake, &texts).await;
    let index = RetrievalIndex::open(&dir.path().join("retrieval")).unwrap();
    let e = index.search(&facts(), "tavrin", 4).unwrap_err();
    assert!(!e.is_caller(), "before the first update the index is not ready, not the caller's fault: {e}");

    // A private datanet is not indexed, and asking for it is the caller's error.
    let u = retrieval::sync(&index, &lake).await.unwrap();
    assert_eq!((u.added, u.removed), (0, 0));
    let e = index.search(&facts(), "tavrin lanterns", 4).unwrap_err();
    assert!(e.is_caller() && e.to_string().contains("private"), "{e}");
    let e = index.search(&["nope".parse().unwrap()], "tavrin", 4).unwrap_err();
    assert!(e.is_caller() && e.to_string().contains("does not exist"), "{e}");

    publish(&lake, Visibility::Public, 0).await;
    let u = retrieval::sync(&index, &lake).await.unwrap();
    assert_eq!((u.added, u.removed, u.chunks), (3, 0, 3), "the flagged contribution is left out");
    assert_eq!(retrieval::sync(&index, &lake).await.unwrap(), retrieval::Updated::default(), "nothing new, nothing done");

    let found = index.search(&facts(), "Which lanterns burn in Tavrin at dusk?", 4).unwrap();
    assert_eq!(found.len(), 2, "two contributions mention tavrin: {found:?}");
    assert_eq!(found[0].contribution_id, id_of(1, SECOND), "lanterns + dusk + tavrin beats tavrin alone");
    assert_eq!(found[1].contribution_id, id_of(2, THIRD));
    assert!(found[0].relevance > found[1].relevance && found[1].relevance > 0.0);
    assert_eq!((found[0].contributor, found[0].chunk), (addr(3), 0));
    assert!(found[0].text.starts_with(SECOND));
    assert_eq!(index.search(&facts(), "tavrin", 1).unwrap().len(), 1, "top_k caps");
    assert!(index.search(&facts(), "?! ...", 4).unwrap().is_empty(), "no words, no passages");
    assert!(index.search(&facts(), "forged ledger ostrava", 4).unwrap().is_empty(), "flagged text is never retrieved");
    for bad in [0, retrieval::MAX_TOP_K + 1] {
        assert!(index.search(&facts(), "tavrin", bad).unwrap_err().is_caller());
    }
    assert!(index.search(&[], "tavrin", 4).unwrap_err().is_caller());
    let many: Vec<DatanetId> = (0..=retrieval::MAX_DATANETS).map(|i| format!("d{i}").parse().unwrap()).collect();
    assert!(index.search(&many, "tavrin", 4).unwrap_err().to_string().contains("at most"));
    let repeated = vec!["facts".parse().unwrap(); 1000];
    assert_eq!(index.search(&repeated, "tavrin", 4).unwrap().len(), 2, "a datanet named twice is searched once");

    // A rejection takes the contribution out; the index persists across opens.
    commit(
        &lake,
        vec![
            ContributionReviewed {
                event_id: "rev-again".parse().unwrap(),
                event_time: at(9),
                contribution_id: id_of(1, SECOND),
                datanet_id: "facts".parse().unwrap(),
                reviewer: addr(1),
                verdict: Verdict::Rejected,
                reason: Some("wrong".into()),
                signature: signature(),
            }
            .into(),
        ],
    )
    .await;
    let u = retrieval::sync(&index, &lake).await.unwrap();
    assert_eq!((u.added, u.removed), (0, 1));
    let found = index.search(&facts(), "Which lanterns burn in Tavrin at dusk?", 4).unwrap();
    assert_eq!(found.iter().map(|p| p.contribution_id.clone()).collect::<Vec<_>>(), [id_of(2, THIRD)]);
    drop(index);
    let index = RetrievalIndex::open(&dir.path().join("retrieval")).unwrap();
    assert_eq!(index.contributions().unwrap().len(), 2);
    assert_eq!(index.chunk_count(), 2);

    // Made private again, the datanet leaves the index.
    publish(&lake, Visibility::Private, 1).await;
    let u = retrieval::sync(&index, &lake).await.unwrap();
    assert_eq!((u.added, u.removed), (0, 2));
    assert_eq!(index.chunk_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cited_contributions_earn_by_relevance_and_rejected_ones_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(LakeConfig::parse(dir.path().join("lake").to_str().unwrap()).unwrap());
    let texts = [(CANARY, 2, Verdict::Approved), (SECOND, 3, Verdict::Approved), (FLAGGED, 5, Verdict::Flagged)];
    contributions(&lake, &texts).await;
    let cite = |inference: &str, rank: u32, contribution, chunk, relevance| {
        InferenceCited {
            event_id: format!("{inference}:cited:{rank}").parse().unwrap(),
            event_time: at(5),
            inference_id: inference.parse().unwrap(),
            model_id: "ledgerlake-base".parse().unwrap(),
            contribution_id: contribution,
            datanet_id: "facts".parse().unwrap(),
            rank,
            chunk,
            relevance,
        }
        .into()
    };
    commit(
        &lake,
        vec![
            cite("inf-rag", 0, id_of(1, SECOND), 0, 6.0),
            cite("inf-rag", 1, id_of(0, CANARY), 0, 2.0),
            cite("inf-rag", 2, id_of(0, CANARY), 1, 1.0),
            cite("inf-rag", 3, id_of(2, FLAGGED), 0, 9.0),
            cite("inf-other", 0, id_of(0, CANARY), 0, 1.0),
        ],
    )
    .await;
    commit(&lake, vec![tokens("inf-rag", "an answer that quotes nothing of any contribution")]).await;

    let (approved, _) = job::approved(&lake).await.unwrap();
    let (pending, _) = job::pending(&lake, 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    let (cited, version) = job::citations(&lake, &pending).await.unwrap();
    assert_eq!(version, 1, "the table created, then one commit of citations");
    assert_eq!(cited.len(), 1, "only pending inferences' citations are read");
    let part = job::retrieval_part(&cited[&pending[0].inference_id], &approved);
    assert_eq!(part.method, AttributionMethod::Retrieval);
    let events = job::attribute(&pending[0], &Mix::default(), &[part], &[], &approved, "test").unwrap();
    let r = rows(&events);
    let by: HashMap<_, _> = r.iter().map(|r| (r.contribution_id.clone().unwrap(), (r.weight, r.raw_score, r.method))).collect();
    assert_eq!(by.len(), 2, "the flagged contribution earns nothing: {by:?}");
    assert_eq!(by[&id_of(0, CANARY)], (WEIGHT_SCALE / 3, 3.0, AttributionMethod::Retrieval), "two chunks' relevance summed");
    assert_eq!(by[&id_of(1, SECOND)], (WEIGHT_SCALE - WEIGHT_SCALE / 3, 6.0, AttributionMethod::Retrieval));
}
