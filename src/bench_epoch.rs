//! `ledgerlake bench epoch`: closing a reward epoch at scale, proof lookups over HTTP, and
//! the gas of a claim beside Uniswap's merkle-distributor.
//!
//! The lake is synthetic, written straight into Delta: `--models` registered models (each
//! with its own builder), `--stakers` stakes, `--inferences` fees on one day, each
//! attributed to `--rows` random contributions of `--contributions` (owned by the
//! contributor accounts, so `--accounts` accounts in all with builders, stakers and the
//! treasury). Timed: the close, step by step, through the ingest writer as `up` closes;
//! then proof lookups through the real `GET /v1/epochs/{n}/proofs/{account}` route. With
//! `--rpc`, the contracts are deployed on that node, the root anchored, and claims sent:
//! ours and, from the npm package `@uniswap/merkle-distributor`'s build, Uniswap's, for the
//! same accounts and amounts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address as EvmAddress, B256, Bytes, U256, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;
use anyhow::{Context, Result, ensure};
use chrono::{TimeZone, Utc};
use ledgerlake_attribution::epoch_job::{self, Closing, EpochConfig};
use ledgerlake_attribution::epochs::Policy;
use ledgerlake_attribution::merkle::LeafTree;
use ledgerlake_ingest::{ApiKeys, Ingestor, WriterConfig};
use ledgerlake_lakehouse::events::{AttributionMethod, Event, FeeCharged, InferenceAttributed, ModelRegistered, StakeAction, StakeChanged};
use ledgerlake_lakehouse::{Address, Amount, EventKind, Lake, LakeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Fees (inferences) in the epoch.
    #[arg(long, default_value_t = 1_000_000)]
    pub inferences: usize,
    /// Contributions they are attributed to.
    #[arg(long, default_value_t = 100_000)]
    pub contributions: usize,
    /// Accounts paid: contributors, builders and stakers (plus the treasury).
    #[arg(long, default_value_t = 100_000)]
    pub accounts: usize,
    /// Attribution rows per inference.
    #[arg(long, default_value_t = 3)]
    pub rows: usize,
    #[arg(long, default_value_t = 100)]
    pub models: usize,
    #[arg(long, default_value_t = 1_000)]
    pub stakers: usize,
    /// Proof lookups timed.
    #[arg(long, default_value_t = 2_000)]
    pub lookups: usize,
    /// A JSON-RPC node to deploy, anchor and claim on (gas); none: no chain part.
    #[arg(long)]
    pub rpc: Option<String>,
    /// Uniswap merkle-distributor's build directory (the npm package's `build/`).
    #[arg(long, default_value = "chain/node_modules/@uniswap/merkle-distributor/build")]
    pub uniswap: PathBuf,
    /// Claims sent on each distributor.
    #[arg(long, default_value_t = 10)]
    pub claims: usize,
    /// Work directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const ROWS_PER_COMMIT: usize = 200_000;

async fn commit(lake: &Lake, kind: EventKind, events: &[Event]) -> Result<()> {
    crate::bench_job::commit_in(lake, kind, events, ROWS_PER_COMMIT).await
}

fn account(i: usize) -> Address {
    let h = keccak256((i as u64).to_be_bytes());
    let mut a = [0u8; 20];
    a.copy_from_slice(&h[12..]);
    Address::from_bytes(a)
}

pub async fn run(opts: Options) -> Result<()> {
    ensure!(opts.accounts > opts.models + opts.stakers, "--accounts must exceed --models + --stakers");
    ensure!(opts.inferences > 0 && opts.contributions > 0 && opts.rows > 0, "give inferences, contributions and rows");
    let tmp = tempfile::tempdir()?;
    let dir = opts.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    let lake = Lake::new(LakeConfig::parse(&dir.join("lake").display().to_string())?);
    let contributors = opts.accounts - opts.models - opts.stakers;
    let day = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().context("the bench day")?;
    let mut rng = StdRng::seed_from_u64(15);

    let started = Instant::now();
    let models: Vec<Event> = (0..opts.models)
        .map(|m| -> Result<Event> {
            Ok(ModelRegistered {
                event_id: format!("reg-{m}").parse()?,
                event_time: day - chrono::TimeDelta::days(1),
                model_id: format!("model-{m}").parse()?,
                builder: account(contributors + m),
                base_model: "ledgerlake-base".into(),
                adapter_uri: format!("adapters/model-{m}"),
                datanets: vec![],
                price_per_1k_input: Amount::new(1)?,
                price_per_1k_output: Amount::new(1)?,
                training_run_id: None,
                contributions_sha256: None,
                hyperparameters: None,
                evaluation: None,
                signature: None,
            }
            .into())
        })
        .collect::<Result<_>>()?;
    commit(&lake, EventKind::ModelRegistered, &models).await?;
    let stakes: Vec<Event> = (0..opts.stakers)
        .map(|s| -> Result<Event> {
            Ok(StakeChanged {
                event_id: format!("stake-{s}").parse()?,
                event_time: day - chrono::TimeDelta::hours(1) + chrono::TimeDelta::minutes((s % 120) as i64),
                staker: account(contributors + opts.models + s),
                model_id: format!("model-{}", s % opts.models).parse()?,
                action: StakeAction::Stake,
                amount: Amount::new(rng.random_range(1..=1_000_000u128) * 10u128.pow(18))?,
            }
            .into())
        })
        .collect::<Result<_>>()?;
    commit(&lake, EventKind::StakeChanged, &stakes).await?;
    let mut fees = Vec::with_capacity(opts.inferences);
    let mut rows = Vec::with_capacity(opts.inferences * opts.rows);
    let second = 86_400_000_000i64 / opts.inferences as i64;
    for i in 0..opts.inferences {
        let model = format!("model-{}", rng.random_range(0..opts.models));
        let at = day + chrono::TimeDelta::microseconds(i as i64 * second);
        fees.push(Event::from(FeeCharged {
            event_id: format!("fee-{i}").parse()?,
            event_time: at,
            inference_id: format!("inf-{i}").parse()?,
            model_id: model.parse()?,
            payer: "bench".into(),
            amount: Amount::new(rng.random_range(1..10_000_000_000_000_000u128))?,
        }));
        let mut cuts: Vec<u64> = (1..opts.rows).map(|_| rng.random_range(0..=1_000_000_000)).collect();
        cuts.sort();
        let bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(1_000_000_000)).collect();
        for (k, w) in bounds.windows(2).enumerate() {
            let c = rng.random_range(0..opts.contributions);
            rows.push(Event::from(InferenceAttributed {
                event_id: format!("attr-{i}-{k}").parse()?,
                event_time: at + chrono::TimeDelta::seconds(30),
                inference_id: format!("inf-{i}").parse()?,
                model_id: model.parse()?,
                contribution_id: Some(format!("{c:064x}").parse()?),
                contributor: Some(account(c % contributors)),
                datanet_id: Some(format!("datanet-{}", c % 10).parse()?),
                method: AttributionMethod::Spans,
                raw_score: 1.0,
                weight: w[1] - w[0],
                spans: vec![],
                basis: "bench".into(),
            }));
        }
    }
    commit(&lake, EventKind::FeeCharged, &fees).await?;
    drop(fees);
    commit(&lake, EventKind::InferenceAttributed, &rows).await?;
    let attribution_rows = rows.len();
    drop(rows);
    println!(
        "lake: {} fees, {attribution_rows} attribution rows over {} contributions, {} models, {} stakes ({:.1}s to write)",
        opts.inferences,
        opts.contributions,
        opts.models,
        opts.stakers,
        started.elapsed().as_secs_f64()
    );

    // Close through the ingest writer, as `up` does.
    let state = dir.join("state");
    let ingestor = Ingestor::start(lake.clone(), state.join("index"), WriterConfig::default()).await?;
    let config = EpochConfig {
        genesis: day,
        length_s: 86_400,
        grace_s: 0,
        policy: Policy {
            treasury: crate::config::TREASURY.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
            treasury_bps: 1_000,
            builder_bps: 3_000,
            stakers_bps: 1_000,
            contributors_bps: 5_000,
        },
    };
    let send_ingestor = ingestor.clone();
    let send = move |events: Vec<Event>| {
        let publisher = crate::finetune_cmd::LakePublisher(send_ingestor.clone());
        async move {
            use ledgerlake_factory::Publisher;
            publisher.send(events).await.map_err(ledgerlake_attribution::Error::Lake)
        }
    };
    let started = Instant::now();
    let closing = epoch_job::close(&lake, &config, 0, Utc::now(), None, &ledgerlake_attribution::anchor::LogAnchor, send).await?;
    let total = started.elapsed().as_secs_f64();
    let Closing::Closed(row, took) = closing else { anyhow::bail!("the bench lake had a closed epoch already") };
    println!("close epoch 0: {total:.2}s ({} fees, {} accounts, root {})", row.fee_count.unwrap_or(0), row.accounts.unwrap_or(0), row.merkle_root.clone().map(|r| r.to_string()).unwrap_or_default());
    for t in &took {
        println!("  {:<28} {:>8.3}s  {:>5.1}%", t.step, t.seconds, 100.0 * t.seconds / total);
    }

    // Proof lookups through the real route.
    let admin = "bench-admin-key-0123456789";
    let (keys, _) = ApiKeys::open(&state, Some(admin))?;
    let epochs = crate::epoch_http::EpochState {
        lake: lake.clone(),
        keys: Arc::new(keys),
        config: config.clone(),
        anchor: crate::epoch_cmd::Anchors::Log(ledgerlake_attribution::anchor::LogAnchor),
        pause_after_anchor: std::time::Duration::ZERO,
        ingestor: ingestor.clone(),
        trees: Default::default(),
        closing: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, crate::epoch_http::router(epochs)).await });
    let client = reqwest::Client::new();
    let tree = epoch_job::tree(&lake, 0).await?.context("the epoch paid no one")?;
    let values = tree.values().to_vec();
    let get = |a: Address| client.get(format!("{url}/v1/epochs/0/proofs/{a}")).bearer_auth(admin).send();
    let started = Instant::now();
    let first = get(values[0].0).await?;
    ensure!(first.status().is_success(), "proof lookup answered {}", first.status());
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut latencies = Vec::with_capacity(opts.lookups);
    for _ in 0..opts.lookups {
        let a = values[rng.random_range(0..values.len())].0;
        let t = Instant::now();
        let r = get(a).await?;
        ensure!(r.status().is_success(), "proof lookup answered {}", r.status());
        let _: serde_json::Value = r.json().await?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "proof lookup over HTTP ({} accounts): first {first_ms:.0} ms (builds the tree from the rewards rows), then p50 {:.3} ms, p99 {:.3} ms over {} lookups",
        values.len(),
        pct(0.5),
        pct(0.99),
        latencies.len()
    );

    if let Some(rpc) = &opts.rpc {
        gas(&opts, rpc, &lake, &tree, row.fees.map_or(0, |f| f.base_units())).await?;
    }
    drop(ingestor);
    Ok(())
}

/// The first three accounts of `ganache --wallet.deterministic` (public test keys, funded
/// with ether on that node only): the deployer (who also sends the claims), the treasury
/// and the anchorer.
const GANACHE_KEYS: [&str; 3] = [
    "0x4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d",
    "0x6cbed15c793ce57650b9877cf6fa156fbef513c4e6134f022a85b1ffdd59b2a1",
    "0x6370fd033278c143179d81c5526140625662b8daa446c22ee2d73db3707e620c",
];

alloy::sol! {
    #[sol(rpc)]
    interface IUniswapDistributor {
        function claim(uint256 index, address account, uint256 amount, bytes32[] calldata merkleProof) external;
    }
}

/// Deploys ours and Uniswap's distributor for the epoch's accounts and amounts, sends
/// `--claims` claims on each, and prints the gas.
async fn gas(opts: &Options, rpc: &str, lake: &Lake, tree: &ledgerlake_attribution::merkle::RewardTree, fees: u128) -> Result<()> {
    let [deployer, treasury, anchorer] = GANACHE_KEYS;
    let address = |key: &str| crate::evm::provider(rpc, key).map(|(_, a)| a);
    let roles = crate::evm::Roles { treasury: address(treasury)?, anchorer: address(anchorer)?, admin: None };
    let deployment = crate::evm::deploy(rpc, deployer, roles, 0).await?;
    crate::evm::fund(rpc, treasury, deployment.distributor, U256::from(fees)).await?;
    let anchor = crate::evm::EvmAnchor { rpc: rpc.into(), key: anchorer.into(), contract: deployment.anchor };
    let row = epoch_job::recorded(lake).await?.remove(&0).and_then(|r| r.closed).context("epoch 0 is not closed")?;
    let request = ledgerlake_attribution::anchor::AnchorRequest {
        epoch: 0,
        root: row.merkle_root.clone().context("no root")?,
        manifest_sha256: row.manifest_sha256.clone().context("no manifest")?,
        total: row.fees.unwrap_or_default(),
    };
    use ledgerlake_attribution::anchor::Anchor;
    let anchored = anchor.anchor(lake, &request, Utc::now()).await?;
    println!("anchored on {rpc}: {}", anchored.reference);
    let values = tree.values();
    let step = values.len() / opts.claims.max(1);
    let mut ours = Vec::new();
    for k in 0..opts.claims {
        let i = k * step;
        let (a, amount) = values[i];
        let proof: Vec<B256> = tree.proof(i).context("proof")?.into_iter().map(B256::from).collect();
        let c = crate::evm::claim(rpc, deployer, deployment.distributor, 0, a.to_alloy(), U256::from(amount.base_units()), proof).await?;
        ours.push(c.gas_used);
    }

    // Uniswap's distributor over the same (account, amount) list: leaf =
    // keccak256(abi.encodePacked(index, account, amount)), sorted-pair tree.
    let artifact = |name: &str| -> Result<Bytes> {
        let path = opts.uniswap.join(format!("{name}.json"));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
        let hex = json["bytecode"].as_str().context("no bytecode")?;
        Ok(Bytes::from(hex::decode(hex.trim_start_matches("0x"))?))
    };
    let leaves: Vec<[u8; 32]> = values
        .iter()
        .enumerate()
        .map(|(i, (a, v))| keccak256((U256::from(i), a.to_alloy(), U256::from(v.base_units())).abi_encode_packed()).0)
        .collect();
    let utree = LeafTree::new(&leaves)?;
    let (provider, _) = crate::evm::provider(rpc, deployer)?;
    let deploy = async |code: Bytes, args: Vec<u8>| -> Result<EvmAddress> {
        let mut input = code.to_vec();
        input.extend(args);
        let tx = TransactionRequest::default().with_deploy_code(input);
        let receipt = provider.send_transaction(tx).await?.get_receipt().await?;
        receipt.contract_address.context("no contract deployed")
    };
    let token = deploy(artifact("TestERC20")?, ("Token".to_string(), "TKN".to_string(), U256::from(fees)).abi_encode_params()).await?;
    let distributor = deploy(artifact("MerkleDistributor")?, (token, B256::from(utree.root())).abi_encode_params()).await?;
    let erc20 = crate::evm::OpenToken::new(token, &provider);
    erc20.transfer(distributor, U256::from(fees)).send().await?.get_receipt().await?;
    let uni = IUniswapDistributor::new(distributor, &provider);
    let mut theirs = Vec::new();
    for k in 0..opts.claims {
        let i = k * step;
        let (a, amount) = values[i];
        let proof: Vec<B256> = utree.proof(i).context("proof")?.into_iter().map(B256::from).collect();
        let receipt = uni.claim(U256::from(i), a.to_alloy(), U256::from(amount.base_units()), proof).send().await?.get_receipt().await?;
        ensure!(receipt.status(), "Uniswap claim {i} reverted");
        theirs.push(receipt.gas_used);
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    println!(
        "gas per claim ({} leaves, {}-hash proofs), mean of {}: ledgerlake RewardDistributor {:.0} (min {}, max {}); Uniswap MerkleDistributor {:.0} (min {}, max {})",
        values.len(),
        tree.proof(0).map_or(0, |p| p.len()),
        opts.claims,
        mean(&ours),
        ours.iter().min().unwrap_or(&0),
        ours.iter().max().unwrap_or(&0),
        mean(&theirs),
        theirs.iter().min().unwrap_or(&0),
        theirs.iter().max().unwrap_or(&0)
    );
    Ok(())
}
