//! A realistic synthetic workload, deterministic for a seed: datanets (and updates of
//! some of them), signed contributions, owner-signed reviews, access grants, models, stakes, and inferences with
//! their fees. Every event is valid, and dependencies come before what depends on them.
//! `ledgerlake demo` sends it through the public API; the benchmark and the tests use it.

use chrono::{DateTime, Duration, TimeZone, Utc};
use ledgerlake_lakehouse::events::*;
use ledgerlake_lakehouse::Deployment;
use ledgerlake_lakehouse::ids::{Amount, Bytes32, ContributionId, DatanetId, EventId, InferenceId, ModelId, Sha256Hex, Signature};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::sign::Keypair;

const TOPICS: &[&str] = &["climate", "medicine", "law", "finance", "code", "poetry", "history", "chemistry"];
const SENTENCES: &[&str] = &[
    "Sea surface temperatures rose faster in the last decade than in the one before.",
    "The patient's symptoms resolved within two weeks of starting the treatment.",
    "A contract is void when one party lacked the capacity to consent.",
    "Index funds reduce fees by tracking a market benchmark instead of picking stocks.",
    "Ownership and borrowing rules let the compiler prove memory safety.",
    "The river ran silver under a moon that would not keep its promises.",
    "Trade routes across the desert carried salt, gold and manuscripts.",
    "Catalysts lower the activation energy of a reaction without being consumed.",
];

/// Generates the demo workload.
pub struct Workload {
    rng: StdRng,
    seed: u64,
    start: DateTime<Utc>,
    next_event: u64,
    participant_events: u64,
    datanets: Vec<(DatanetId, Keypair)>,
    contributors: Vec<Keypair>,
    contributions: Vec<(ContributionId, usize)>,
    models: Vec<ModelId>,
    callers: Vec<String>,
    /// Participant events are signed (EIP-712) for this deployment.
    deployment: Deployment,
}

impl Workload {
    /// The workload of `seed`, signed for no deployment in particular and starting on
    /// 2026-11-01: for tests and benchmarks that hand events to ingest as ledgerlake does.
    pub fn new(seed: u64) -> Self {
        let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().unwrap_or_else(Utc::now);
        Self::for_deployment(seed, Deployment { id: Bytes32::from_bytes([0; 32]), chain_id: None }, start)
    }

    /// The workload of `seed`, its participant events signed for `deployment` and its
    /// events timed from `start` (37 ms apart, participant events first, so a server takes
    /// them within its skew bound when `start` is now).
    pub fn for_deployment(seed: u64, deployment: Deployment, start: DateTime<Utc>) -> Self {
        let contributors = (0..32).map(|i| Keypair::from_seed(format!("demo-{seed}-contributor-{i}").as_bytes())).collect();
        Self {
            deployment,
            rng: StdRng::seed_from_u64(seed),
            seed,
            start,
            next_event: 0,
            participant_events: 0,
            datanets: Vec::new(),
            contributors,
            contributions: Vec::new(),
            models: Vec::new(),
            callers: (0..16).map(|i| format!("key_demo{i:02}")).collect(),
        }
    }

    /// A participant event's envelope: its time is 1 ms after the previous participant
    /// event's, so even a large workload's signed events stay within a server's skew bound
    /// of `start`.
    fn participant_envelope(&mut self) -> (EventId, DateTime<Utc>) {
        let (id, _) = self.envelope();
        let time = self.start + Duration::milliseconds(self.participant_events as i64);
        self.participant_events += 1;
        (id, time)
    }

    fn envelope(&mut self) -> (EventId, DateTime<Utc>) {
        let n = self.next_event;
        self.next_event += 1;
        // Ids are unique per seed, so two runs with one seed produce the same (duplicate) events.
        let id = format!("demo-{}-{n:012}", self.seed).parse().unwrap_or_else(|_| unreachable!("demo ids are valid"));
        let time = self.start + Duration::milliseconds((n * 37) as i64);
        (id, time)
    }

    /// Exactly `n` events: a few of each governance kind up front, then mostly inferences
    /// and their fees (the high-volume tables).
    pub fn events(&mut self, n: usize) -> Vec<Event> {
        let datanets = (n / 2000).clamp(1, 200);
        let contributions = (n / 20).max(1);
        let reviews = contributions / 2;
        let models = (n / 1000).clamp(1, 500);
        let grants = models;
        let stakes = (n / 200).max(1);
        let mut out = Vec::with_capacity(n);
        let push = |out: &mut Vec<Event>, e: Event| {
            if out.len() < n {
                out.push(e);
            }
        };
        for _ in 0..datanets {
            let e = self.datanet();
            push(&mut out, e);
        }
        // Every fourth owner rewrites the description of a datanet.
        for d in (0..datanets).step_by(4) {
            let e = self.datanet_update(d);
            push(&mut out, e);
        }
        for _ in 0..contributions {
            let e = self.contribution();
            push(&mut out, e);
        }
        for _ in 0..reviews {
            let e = self.review();
            push(&mut out, e);
        }
        let mut given = Vec::new();
        for _ in 0..grants {
            // The builder asks first; its owner grants.
            let (request, e) = self.grant();
            push(&mut out, request);
            given.push(e.clone());
            push(&mut out, e);
        }
        // Every fifth grant is revoked again by its owner.
        for g in given.iter().step_by(5) {
            let e = self.revoke(g);
            push(&mut out, e);
        }
        for _ in 0..models {
            let e = self.model();
            push(&mut out, e);
        }
        // Each model's training run: its steps, then the run.
        for m in 0..models {
            for e in self.training(m) {
                push(&mut out, e);
            }
        }
        for _ in 0..stakes {
            let e = self.stake();
            push(&mut out, e);
        }
        // Every 50th inference also stores its token ids.
        let mut k = 0usize;
        while out.len() < n {
            let (inference, fee) = self.inference();
            let tokens = k.is_multiple_of(50).then(|| self.tokens_of(&inference)).flatten();
            k += 1;
            push(&mut out, inference);
            push(&mut out, fee);
            if let Some(t) = tokens {
                let attributed = self.unattributed(&t);
                if let Some(cited) = self.citation(&t, k) {
                    push(&mut out, cited);
                }
                push(&mut out, t);
                push(&mut out, attributed);
            }
        }
        out
    }

    /// The record that an inference's tokens were attributed to no contribution.
    fn unattributed(&mut self, tokens: &Event) -> Event {
        let (event_id, event_time) = self.envelope();
        let (inference_id, model_id) = match tokens {
            Event::InferenceTokens(t) => (t.inference_id.clone(), t.model_id.clone()),
            _ => unreachable!("called with the events tokens_of makes"),
        };
        InferenceAttributed {
            event_id,
            event_time,
            inference_id,
            model_id,
            contribution_id: None,
            contributor: None,
            datanet_id: None,
            method: AttributionMethod::Spans,
            raw_score: 0.0,
            weight: 0,
            spans: Vec::new(),
            basis: "demo".into(),
        }
        .into()
    }

    /// A passage retrieval put into an inference's prompt: the `k`th contribution (chosen
    /// without a draw, so the random choices of the rest of the workload stay the same).
    fn citation(&mut self, tokens: &Event, k: usize) -> Option<Event> {
        let Event::InferenceTokens(t) = tokens else { return None };
        let (contribution, d) = self.contributions.get(k % self.contributions.len().max(1))?.clone();
        let (event_id, event_time) = self.envelope();
        Some(
            InferenceCited {
                event_id,
                event_time,
                inference_id: t.inference_id.clone(),
                model_id: t.model_id.clone(),
                contribution_id: contribution,
                datanet_id: self.datanets[d].0.clone(),
                rank: 0,
                chunk: 0,
                relevance: 1.5,
            }
            .into(),
        )
    }

    /// The `inference.tokens` of an inference: made-up ids, as many as it counted.
    fn tokens_of(&mut self, inference: &Event) -> Option<Event> {
        let Event::InferenceCompleted(i) = inference else { return None };
        let (event_id, event_time) = self.envelope();
        let ids = |n: u32, from: u32| (0..n).map(|t| (t * 7919 + from) % 49_152).collect::<Vec<u32>>();
        Some(
            InferenceTokens {
                event_id,
                event_time,
                inference_id: i.inference_id.clone(),
                model_id: i.model_id.clone(),
                prompt_token_ids: ids(i.prompt_tokens, 1),
                output_token_ids: ids(i.completion_tokens, 2),
            }
            .into(),
        )
    }

    /// `n` more inferences, each followed by its fee, for models of an earlier
    /// [`Workload::events`] call (which must have run first: it registers the models).
    pub fn inferences(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(2 * n);
        if self.models.is_empty() {
            return out;
        }
        for _ in 0..n {
            let (inference, fee) = self.inference();
            out.push(inference);
            out.push(fee);
        }
        out
    }

    fn datanet(&mut self) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let i = self.datanets.len();
        let topic = TOPICS[i % TOPICS.len()];
        let id: DatanetId = format!("{topic}-{i}").parse().unwrap_or_else(|_| unreachable!("slug"));
        let owner = Keypair::from_seed(format!("demo-{}-owner-{i}", self.seed).as_bytes());
        let e = DatanetCreated {
            event_id,
            event_time,
            datanet_id: id.clone(),
            owner: owner.address(),
            name: format!("{topic} corpus {i}"),
            description: format!("Curated {topic} texts"),
            license: "CC-BY-4.0".into(),
            // Every third demo datanet is public.
            visibility: Some(if i % 3 == 0 { Visibility::Public } else { Visibility::Private }),
            signature: None,
        };
        let e = self.signed(&owner, e.into());
        self.datanets.push((id, owner));
        e
    }

    /// `event` signed by `by` for the workload's deployment.
    fn signed(&self, by: &Keypair, mut event: Event) -> Event {
        by.sign_event(&mut event, &self.deployment).unwrap_or_else(|e| unreachable!("demo events are participant events: {e}"));
        event
    }

    fn datanet_update(&mut self, d: usize) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let (datanet_id, owner) = &self.datanets[d];
        let e = DatanetUpdated {
            event_id,
            event_time,
            datanet_id: datanet_id.clone(),
            updated_by: owner.address(),
            name: None,
            description: Some(format!("Curated and reviewed texts, revision {}", d + 2)),
            license: None,
            status: None,
            visibility: None,
            signature: None,
        };
        self.signed(owner, e.into())
    }

    fn contribution(&mut self) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let d = self.rng.random_range(0..self.datanets.len());
        let who = self.rng.random_range(0..self.contributors.len());
        let n = self.contributions.len();
        let content = format!("{} (note {}-{n})", SENTENCES[self.rng.random_range(0..SENTENCES.len())], self.seed);
        let contributor = &self.contributors[who];
        // Signing fills in the content's hash and the contribution id.
        let e = ContributionSubmitted {
            event_id,
            event_time,
            contribution_id: None,
            datanet_id: self.datanets[d].0.clone(),
            contributor: contributor.address(),
            content,
            content_sha256: None,
            license: "CC-BY-4.0".into(),
            language: Some("en".into()),
            source: None,
            tags: vec![TOPICS[d % TOPICS.len()].to_owned()],
            signature: Signature::placeholder(),
        };
        let e = self.signed(contributor, e.into());
        if let Event::ContributionSubmitted(ContributionSubmitted { contribution_id: Some(id), .. }) = &e {
            self.contributions.push((id.clone(), d));
        }
        e
    }

    fn review(&mut self) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let (contribution, d) = self.contributions[self.rng.random_range(0..self.contributions.len())].clone();
        let verdict = match self.rng.random_range(0..10) {
            0 => Verdict::Rejected,
            1 => Verdict::Flagged,
            _ => Verdict::Approved,
        };
        let (datanet_id, owner) = &self.datanets[d];
        let e = ContributionReviewed {
            event_id,
            event_time,
            contribution_id: contribution,
            datanet_id: datanet_id.clone(),
            reviewer: owner.address(),
            verdict,
            reason: (verdict != Verdict::Approved).then(|| "off-topic or unverifiable".to_owned()),
            signature: Signature::placeholder(),
        };
        let owner = &self.datanets[d].1;
        self.signed(owner, e.into())
    }

    /// The builder of model `m`: the same for every seed, as model ids are, so the demo
    /// workloads of two seeds agree on who owns each model id.
    fn builder(&self, m: usize) -> Keypair {
        Keypair::from_seed(format!("demo-builder-{}", m % 8).as_bytes())
    }

    /// A builder's request for a datanet and its owner's grant.
    fn grant(&mut self) -> (Event, Event) {
        let m = self.models.len() + self.rng.random_range(0..4);
        let d = self.rng.random_range(0..self.datanets.len());
        let (event_id, event_time) = self.participant_envelope();
        let builder = self.builder(m);
        let request = AccessRequested {
            event_id,
            event_time,
            datanet_id: self.datanets[d].0.clone(),
            builder: builder.address(),
            message: Some(format!("a {} adapter", TOPICS[m % TOPICS.len()])),
            signature: Signature::placeholder(),
        };
        let request = self.signed(&builder, request.into());
        let (event_id, event_time) = self.participant_envelope();
        let e = AccessGranted {
            event_id,
            event_time,
            datanet_id: self.datanets[d].0.clone(),
            builder: self.builder(m).address(),
            granted_by: self.datanets[d].1.address(),
            signature: None,
        };
        (request, self.signed(&self.datanets[d].1, e.into()))
    }

    /// The revocation of `grant` by the datanet's owner.
    fn revoke(&mut self, grant: &Event) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let Event::AccessGranted(g) = grant else { unreachable!("revoke takes a grant") };
        let owner = self.datanets.iter().find(|(d, _)| *d == g.datanet_id).map(|(_, k)| k).unwrap_or_else(|| unreachable!("granted datanets exist"));
        let e = AccessRevoked {
            event_id,
            event_time,
            datanet_id: g.datanet_id.clone(),
            builder: g.builder,
            revoked_by: g.granted_by,
            signature: Signature::placeholder(),
        };
        self.signed(owner, e.into())
    }

    fn model(&mut self) -> Event {
        let (event_id, event_time) = self.participant_envelope();
        let m = self.models.len();
        let id: ModelId = format!("{}-lora-{m}", TOPICS[m % TOPICS.len()]).parse().unwrap_or_else(|_| unreachable!("slug"));
        let d = m % self.datanets.len();
        self.models.push(id.clone());
        let e = ModelRegistered {
            event_id,
            event_time,
            model_id: id,
            builder: self.builder(m).address(),
            base_model: "ledgerlake-base".into(),
            adapter_uri: format!("adapters/{}-lora-{m}", TOPICS[m % TOPICS.len()]),
            datanets: vec![DatanetVersion { datanet_id: self.datanets[d].0.clone(), version: 1 }],
            price_per_1k_input: Amount::new(self.rng.random_range(1..50) * 10u128.pow(15)).unwrap_or(Amount::ZERO),
            price_per_1k_output: Amount::new(self.rng.random_range(1..100) * 10u128.pow(15)).unwrap_or(Amount::ZERO),
            training_run_id: Some(format!("demo-run-{m}")),
            contributions_sha256: None,
            hyperparameters: Some(Self::hyperparameters()),
            evaluation: None,
            signature: None,
        };
        self.signed(&self.builder(m), e.into())
    }

    fn hyperparameters() -> Hyperparameters {
        Hyperparameters {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"].map(str::to_owned).to_vec(),
            learning_rate: 2e-4,
            epochs: 1,
            batch_size: 8,
            max_seq_len: 256,
            qlora: false,
            seed: 42,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            heldout_permille: 100,
        }
    }

    /// Three steps of the training run of model `m`, then the run itself.
    fn training(&mut self, m: usize) -> Vec<Event> {
        let run_id = format!("demo-run-{m}");
        let mut out = Vec::new();
        // Four decimals: the JSON form parses back to the same f64.
        let round = |x: f64| (x * 1e4).round() / 1e4;
        let mut loss = 3.0 + round(self.rng.random::<f64>());
        for step in 1..=3u32 {
            let (event_id, event_time) = self.envelope();
            loss = round(loss * 0.8);
            out.push(
                TrainingMetric {
                    event_id,
                    event_time,
                    run_id: run_id.clone(),
                    step,
                    epoch: 0,
                    loss,
                    learning_rate: 2e-4,
                    grad_norm: round(1.0 + self.rng.random::<f64>()),
                    tokens: 2048,
                    tokens_per_second: round(500.0 + 100.0 * self.rng.random::<f64>()),
                }
                .into(),
            );
        }
        let (event_id, event_time) = self.envelope();
        let d = m % self.datanets.len();
        out.push(
            TrainingRun {
                event_id,
                event_time,
                run_id,
                model_id: self.models[m].clone(),
                builder: self.builder(m).address(),
                base_model: "ledgerlake-base".into(),
                datanets: vec![DatanetVersion { datanet_id: self.datanets[d].0.clone(), version: 1 }],
                status: RunStatus::Completed,
                hyperparameters: Self::hyperparameters(),
                evaluation: None,
                train_examples: 100,
                train_tokens: 6144,
                steps: 3,
                started_at: event_time,
                seconds: 12.0,
                tokens_per_second: 512.0,
                peak_memory_bytes: 400 << 20,
                final_loss: Some(loss),
                adapter_uri: Some(format!("adapters/{}", self.models[m])),
                contributions_sha256: None,
                error: None,
            }
            .into(),
        );
        out
    }

    fn stake(&mut self) -> Event {
        let (event_id, event_time) = self.envelope();
        let m = self.rng.random_range(0..self.models.len());
        let who = self.rng.random_range(0..self.contributors.len());
        StakeChanged {
            event_id,
            event_time,
            staker: self.contributors[who].address(),
            model_id: self.models[m].clone(),
            action: if self.rng.random_range(0..5) == 0 { StakeAction::Unstake } else { StakeAction::Stake },
            amount: Amount::new(self.rng.random_range(1..10_000) * Amount::ONE_OPEN.base_units()).unwrap_or(Amount::ZERO),
        }
        .into()
    }

    fn inference(&mut self) -> (Event, Event) {
        let (event_id, event_time) = self.envelope();
        let m = self.rng.random_range(0..self.models.len());
        let caller = self.callers[self.rng.random_range(0..self.callers.len())].clone();
        let inference_id: InferenceId = format!("inf-{}", event_id).parse().unwrap_or_else(|_| unreachable!("id"));
        let prompt_tokens = self.rng.random_range(8..512);
        let completion_tokens = self.rng.random_range(1..256);
        let inference = InferenceCompleted {
            event_id,
            event_time,
            inference_id: inference_id.clone(),
            model_id: self.models[m].clone(),
            caller: caller.clone(),
            prompt_tokens,
            completion_tokens,
            output_sha256: Sha256Hex::digest(inference_id.as_str().as_bytes()),
            latency_ms: self.rng.random_range(20..900),
        };
        let (fee_id, fee_time) = self.envelope();
        let fee = FeeCharged {
            event_id: fee_id,
            event_time: fee_time,
            inference_id,
            model_id: self.models[m].clone(),
            payer: caller,
            amount: Amount::new((prompt_tokens as u128 + 2 * completion_tokens as u128) * 10u128.pow(13)).unwrap_or(Amount::ZERO),
        };
        (inference.into(), fee.into())
    }
}
