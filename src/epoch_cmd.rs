//! `ledgerlake epoch ...` and `ledgerlake anchor verify`: reward epochs from the command
//! line. Reading commands open the lake; `close` asks a running server (it writes through
//! the server's ingest writer). Glue only: `ledgerlake_attribution::epoch_job` does the work.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use ledgerlake_attribution::anchor::{self, Anchor, AnchorRequest, Anchored, LogAnchor};
use ledgerlake_attribution::epoch_job::{self, Closing, EpochConfig};
use ledgerlake_lakehouse::events::EpochClosed;
use ledgerlake_lakehouse::{Address, Event, Lake};

use crate::client::ServerArgs;
use crate::config::{Config, ConfigArgs};

#[derive(Subcommand)]
pub enum EpochCommand {
    /// Every epoch pinned or closed, one line each.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// One epoch: its window and rows, as JSON.
    Show {
        n: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Close an epoch on a running server (admin key): pin its input versions, split its
    /// fees, record the rewards, anchor the root. Closing again is a no-op.
    Close {
        n: u64,
        /// Close it paying no one, for this reason (an admin's decision when its fees
        /// cannot be split, e.g. they overflow; recorded in the epoch and its manifest).
        #[arg(long, value_name = "REASON")]
        empty: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Compute an epoch from its pinned versions (from today's versions for one not yet
    /// pinned) and print its manifest; writes nothing.
    Compute {
        n: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Recompute a closed epoch and compare root, manifest and every rewards row with what
    /// was recorded; check its anchor. Exits non-zero on any difference.
    Verify {
        n: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// An account's amount and Merkle proof in a closed epoch, as JSON.
    Proof {
        n: u64,
        #[arg(long)]
        account: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// A closed epoch's Merkle tree in OpenZeppelin's StandardMerkleTree dump format.
    Tree {
        n: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
pub enum ChainCommand {
    /// Deploy OPEN, EpochAnchor and RewardDistributor (chain/contracts) from the deployer's
    /// key. Three separate accounts hold the three powers: the treasury receives the whole
    /// OPEN supply (and funds the distributor with `chain fund`), the anchorer is the
    /// server's online key (`evm_key`; it may only anchor roots), and the admin grants and
    /// revokes the anchoring role (default: the deployer). Prints the addresses as JSON; put
    /// `evm_anchor` in the configuration and set `anchor = "evm"`.
    Deploy {
        #[arg(long)]
        rpc: String,
        /// The deployer's key (it pays the gas; it keeps the admin role unless --admin).
        #[command(flatten)]
        key: crate::config::EvmKeyArgs,
        /// The address that receives the OPEN supply.
        #[arg(long)]
        treasury: String,
        /// The address of the server's anchoring key.
        #[arg(long)]
        anchorer: String,
        /// The address that may grant and revoke the anchoring role (default: the deployer).
        #[arg(long)]
        admin: Option<String>,
        /// Seconds between an unstake and the withdrawal of its OPEN in the staking
        /// contract (default: 7 days).
        #[arg(long, default_value_t = 7 * 86_400)]
        cooldown_s: u64,
    },
    /// Stake OPEN on a model in the staking contract (approves it first), from the staker's
    /// key. A server with `evm_staking` set records it once it has `evm_confirmations`.
    Stake {
        model: String,
        /// OPEN base units.
        amount: String,
        #[command(flatten)]
        staking: StakingArgs,
    },
    /// Stop part of a stake earning, now; its OPEN is withdrawable after the cooldown.
    Unstake {
        model: String,
        /// OPEN base units.
        amount: String,
        #[command(flatten)]
        staking: StakingArgs,
    },
    /// Take back unstaked OPEN once its cooldown is over.
    Withdraw {
        model: String,
        #[command(flatten)]
        staking: StakingArgs,
    },
    /// Send OPEN from the treasury's key to the distributor, to pay the claims of anchored
    /// epochs.
    Fund {
        #[arg(long)]
        rpc: String,
        /// The treasury's key.
        #[command(flatten)]
        key: crate::config::EvmKeyArgs,
        #[arg(long)]
        distributor: String,
        /// OPEN base units to send.
        #[arg(long)]
        amount: String,
    },
    /// Claim an account's reward of an epoch from the distributor, sending from `--key`
    /// (anyone may claim for anyone; the OPEN goes to the account). The amount and proof
    /// come from the server unless given.
    Claim {
        epoch: u64,
        #[arg(long)]
        account: String,
        #[arg(long)]
        rpc: String,
        #[arg(long)]
        distributor: String,
        /// The sender's key (it pays the gas).
        #[command(flatten)]
        key: crate::config::EvmKeyArgs,
        /// The amount to claim (default: the epoch's proof's).
        #[arg(long)]
        amount: Option<String>,
        /// The proof, a JSON array of 0x hashes (default: the server's for the account).
        #[arg(long)]
        proof: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Where a staker's call goes, and from which key.
#[derive(clap::Args)]
pub struct StakingArgs {
    #[arg(long)]
    rpc: String,
    /// The `OpenStaking` contract (`chain deploy` prints it).
    #[arg(long)]
    staking: String,
    /// The staker's key.
    #[command(flatten)]
    key: crate::config::EvmKeyArgs,
}

#[derive(Subcommand)]
pub enum AnchorCommand {
    /// Walk the hash-chained anchor log: every entry's hash, every link, and each entry
    /// against its epoch's closed row. Exits non-zero on any break.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// The configured anchor.
#[derive(Clone, Debug)]
pub enum Anchors {
    Log(LogAnchor),
    Evm(crate::evm::EvmAnchor),
}

impl Anchors {
    pub fn from_config(config: &Config) -> Result<Self> {
        match config.anchor.as_str() {
            "log" => Ok(Anchors::Log(LogAnchor)),
            "evm" => {
                let need = |v: &Option<String>, name: &str| v.clone().with_context(|| format!("anchor = \"evm\" needs {name}"));
                Ok(Anchors::Evm(crate::evm::EvmAnchor {
                    rpc: need(&config.evm_rpc_url, "evm_rpc_url")?,
                    key: need(&config.evm_key.as_ref().map(|k| k.expose().to_owned()), "evm_key (or LEDGERLAKE_EVM_KEY)")?,
                    contract: need(&config.evm_anchor, "evm_anchor")?.parse().context("evm_anchor is not an address")?,
                }))
            }
            other => bail!("anchor must be \"log\" or \"evm\", not {other:?}"),
        }
    }

    /// Closes epoch `n` with this anchor, waiting `pause` between anchoring and recording.
    pub async fn close(
        &self,
        lake: &Lake,
        config: &EpochConfig,
        n: u64,
        now: DateTime<Utc>,
        empty: Option<String>,
        pause: std::time::Duration,
        send: impl AsyncFn(Vec<Event>) -> Result<(), ledgerlake_attribution::Error>,
    ) -> Result<Closing, ledgerlake_attribution::Error> {
        match self {
            Anchors::Log(a) => epoch_job::close(lake, config, n, now, empty, &Paused(a, pause), send).await,
            Anchors::Evm(a) => epoch_job::close(lake, config, n, now, empty, &Paused(a, pause), send).await,
        }
    }

    /// What is wrong with a closed epoch's anchoring (nothing: empty).
    pub async fn check(&self, lake: &Lake, row: &EpochClosed) -> Result<Vec<String>, ledgerlake_attribution::Error> {
        let reference = row.anchor.clone().unwrap_or_default();
        if reference.starts_with("log:") {
            let entries = anchor::entries(lake).await?;
            let mut problems = anchor::verify_log(&entries).problems;
            problems.extend(check_entry(&entries, row));
            return Ok(problems);
        }
        if let (Some(_), Anchors::Evm(a)) = (reference.strip_prefix("evm:"), self) {
            let (Some(root), Some(manifest)) = (&row.merkle_root, &row.manifest_sha256) else {
                return Ok(vec![format!("epoch {}: the closed row has no root", row.epoch)]);
            };
            let total = row.fees.unwrap_or_default();
            return a.check(row.epoch, root, manifest, total).await.map_err(|e| ledgerlake_attribution::Error::Lake(format!("{e:#}")));
        }
        Ok(vec![format!("epoch {}: anchor reference {reference:?} is not one this configuration checks", row.epoch)])
    }
}

/// An anchor that waits after anchoring: what crash tests kill the process during.
struct Paused<'a, A>(&'a A, std::time::Duration);

impl<A: Anchor> Anchor for Paused<'_, A> {
    async fn anchor(&self, lake: &Lake, request: &AnchorRequest, now: DateTime<Utc>) -> Result<Anchored, ledgerlake_attribution::Error> {
        let anchored = self.0.anchor(lake, request, now).await?;
        if !self.1.is_zero() {
            tracing::warn!(epoch = request.epoch, ms = self.1.as_millis() as u64, "pausing between anchoring and recording (epoch_pause_after_anchor_ms)");
            tokio::time::sleep(self.1).await;
        }
        Ok(anchored)
    }
}

/// The log entry of a closed epoch holds its root and manifest hash, and the reference
/// names it.
fn check_entry(entries: &[ledgerlake_lakehouse::events::AnchorLogged], row: &EpochClosed) -> Vec<String> {
    let mut problems = Vec::new();
    match entries.iter().find(|e| e.epoch == row.epoch) {
        None => problems.push(format!("epoch {}: no entry in the anchor log", row.epoch)),
        Some(e) => {
            if Some(&e.merkle_root) != row.merkle_root.as_ref() || Some(&e.manifest_sha256) != row.manifest_sha256.as_ref() {
                problems.push(format!("epoch {}: the log holds root {} and manifest {}, the epoch another", row.epoch, e.merkle_root, e.manifest_sha256));
            }
            if row.anchor.as_deref() != Some(format!("log:{}", e.entry_sha256).as_str()) {
                problems.push(format!("epoch {}: the closed row names anchor {:?}, the log's entry is {}", row.epoch, row.anchor, e.entry_sha256));
            }
        }
    }
    problems
}

pub async fn run(command: EpochCommand) -> Result<()> {
    let open = |config: &ConfigArgs| -> Result<(Config, Lake)> {
        let config = Config::load(config)?;
        let lake = Lake::new(config.lake()?);
        Ok((config, lake))
    };
    match command {
        EpochCommand::List { config } => {
            let (_, lake) = open(&config)?;
            println!("{:>8} {:<7} {:<20} {:<20} {:>28} {:<66}", "epoch", "stage", "start", "end", "fees", "root");
            for r in epoch_job::recorded(&lake).await?.values() {
                if let Some(e) = r.latest() {
                    println!(
                        "{:>8} {:<7} {:<20} {:<20} {:>28} {:<66}",
                        e.epoch,
                        if r.closed.is_some() { "closed" } else { "pinned" },
                        e.window_start.format("%Y-%m-%dT%H:%M:%SZ"),
                        e.window_end.format("%Y-%m-%dT%H:%M:%SZ"),
                        e.fees.map(|f| f.to_string()).unwrap_or_default(),
                        e.merkle_root.as_ref().map(|r| r.to_string()).unwrap_or_default()
                    );
                }
            }
        }
        EpochCommand::Show { n, config } => {
            let (config, lake) = open(&config)?;
            let shown = crate::epoch_http::shown(&lake, &config.epochs()?, n).await?;
            println!("{}", serde_json::to_string_pretty(&shown)?);
        }
        EpochCommand::Close { n, empty, server } => {
            let url = format!("{}/v1/epochs/{n}/close", server.server.trim_end_matches('/'));
            let mut request = reqwest::Client::new().post(&url).bearer_auth(server.key()?);
            if let Some(reason) = &empty {
                request = request.query(&[("empty_reason", reason)]);
            }
            let resp = request.send().await.with_context(|| format!("POST {url}"))?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if !status.is_success() {
                bail!("{url} answered {status}: {}", body["error"]["message"].as_str().unwrap_or("(no message)"));
            }
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        EpochCommand::Compute { n, config } => {
            let (config, lake) = open(&config)?;
            let c = crate::epoch_http::computation(&lake, &config.epochs()?, n).await?;
            println!("{}", serde_json::to_string_pretty(&c)?);
        }
        EpochCommand::Verify { n, config } => {
            let (config, lake) = open(&config)?;
            let v = crate::epoch_http::verification(&lake, &Anchors::from_config(&config)?, n).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            if !v.verified {
                bail!("epoch {n} does not verify");
            }
        }
        EpochCommand::Proof { n, account, config } => {
            let (_, lake) = open(&config)?;
            let account: Address = account.parse().map_err(|e| anyhow::anyhow!("--account {account:?}: {e}"))?;
            let tree = epoch_job::tree(&lake, n).await?;
            match tree.as_ref().and_then(|t| epoch_job::proof_in(t, n, &account)) {
                Some(p) => println!("{}", serde_json::to_string_pretty(&p)?),
                None => bail!("{account} earned nothing in epoch {n}"),
            }
        }
        EpochCommand::Tree { n, config } => {
            let (_, lake) = open(&config)?;
            match epoch_job::tree(&lake, n).await? {
                Some(t) => println!("{}", serde_json::to_string(&t.dump())?),
                None => bail!("epoch {n} paid no one: it has no tree"),
            }
        }
    }
    Ok(())
}

/// A staking call from the command line; prints the stake after it as JSON.
async fn stake_call(args: StakingArgs, model: &str, call: crate::evm::StakeCall) -> Result<()> {
    // Only a model id can earn: a stake on anything else would lock OPEN for nothing.
    let model: ledgerlake_lakehouse::ModelId = model.parse().map_err(|e| anyhow::anyhow!("{model:?} is not a model id: {e}"))?;
    let staking = args.staking.parse().context("--staking is not an address")?;
    let done = crate::evm::stake(&args.rpc, args.key.load()?.expose(), staking, model.as_str(), call).await?;
    println!("{}", serde_json::to_string_pretty(&done)?);
    Ok(())
}

pub async fn chain(command: ChainCommand) -> Result<()> {
    match command {
        ChainCommand::Deploy { rpc, key, treasury, anchorer, admin, cooldown_s } => {
            let address = |flag: &str, v: &str| -> Result<alloy::primitives::Address> {
                v.parse::<Address>().map(|a| a.to_alloy()).map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))
            };
            let roles = crate::evm::Roles {
                treasury: address("--treasury", &treasury)?,
                anchorer: address("--anchorer", &anchorer)?,
                admin: admin.as_deref().map(|a| address("--admin", a)).transpose()?,
            };
            let d = crate::evm::deploy(&rpc, key.load()?.expose(), roles, cooldown_s).await?;
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
        ChainCommand::Stake { model, amount, staking } => {
            let amount = amount.parse().context("the amount is not a whole number of base units")?;
            stake_call(staking, &model, crate::evm::StakeCall::Stake(amount)).await?;
        }
        ChainCommand::Unstake { model, amount, staking } => {
            let amount = amount.parse().context("the amount is not a whole number of base units")?;
            stake_call(staking, &model, crate::evm::StakeCall::Unstake(amount)).await?;
        }
        ChainCommand::Withdraw { model, staking } => stake_call(staking, &model, crate::evm::StakeCall::Withdraw).await?,
        ChainCommand::Fund { rpc, key, distributor, amount } => {
            let amount: alloy::primitives::U256 = amount.parse().context("--amount is not a whole number of base units")?;
            let distributor = distributor.parse().context("--distributor is not an address")?;
            let funded = crate::evm::fund(&rpc, key.load()?.expose(), distributor, amount).await?;
            println!("{}", serde_json::to_string_pretty(&funded)?);
        }
        ChainCommand::Claim { epoch, account, rpc, distributor, key, amount, proof, server } => {
            let account_addr: Address = account.parse().map_err(|e| anyhow::anyhow!("--account {account:?}: {e}"))?;
            let (amount, proof) = match (amount, proof) {
                (Some(a), Some(p)) => (a, serde_json::from_str::<Vec<String>>(&p).context("--proof is not a JSON array of hashes")?),
                (amount, proof) => {
                    let url = format!("{}/v1/epochs/{epoch}/proofs/{account_addr}", server.server.trim_end_matches('/'));
                    let resp = reqwest::Client::new().get(&url).bearer_auth(server.key()?).send().await.with_context(|| format!("GET {url}"))?;
                    let status = resp.status();
                    let body: serde_json::Value = resp.json().await.unwrap_or_default();
                    if !status.is_success() {
                        bail!("{url} answered {status}: {}", body["error"]["message"].as_str().unwrap_or("(no message)"));
                    }
                    let served: Vec<String> = serde_json::from_value(body["proof"].clone())?;
                    (
                        amount.unwrap_or_else(|| body["amount"].as_str().unwrap_or_default().to_owned()),
                        match proof {
                            Some(p) => serde_json::from_str(&p).context("--proof is not a JSON array of hashes")?,
                            None => served,
                        },
                    )
                }
            };
            let amount: alloy::primitives::U256 = amount.parse().context("the amount is not a whole number of base units")?;
            let proof = proof.iter().map(|h| h.parse()).collect::<Result<Vec<alloy::primitives::B256>, _>>().context("a proof hash is not 32 bytes of hex")?;
            let distributor = distributor.parse().context("--distributor is not an address")?;
            let claimed = crate::evm::claim(&rpc, key.load()?.expose(), distributor, epoch, account_addr.to_alloy(), amount, proof).await?;
            println!("{}", serde_json::to_string_pretty(&claimed)?);
        }
    }
    Ok(())
}

/// The anchor log walked (`anchor::verify_log`), and each entry checked against its
/// epoch's closed row.
pub async fn verify_anchor_log(lake: &Lake) -> Result<anchor::LogReport, ledgerlake_attribution::Error> {
    let entries = anchor::entries(lake).await?;
    let mut report = anchor::verify_log(&entries);
    let recorded = epoch_job::recorded(lake).await?;
    for e in &entries {
        match recorded.get(&e.epoch).and_then(|r| r.closed.as_ref()) {
            Some(row) => report.problems.extend(check_entry(&entries, row)),
            None => report.problems.push(format!("epoch {}: logged but not closed", e.epoch)),
        }
    }
    Ok(report)
}

pub async fn anchor(command: AnchorCommand) -> Result<()> {
    match command {
        AnchorCommand::Verify { config } => {
            let config = Config::load(&config)?;
            let lake = Lake::new(config.lake()?);
            let report = verify_anchor_log(&lake).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.problems.is_empty() {
                bail!("the anchor log does not verify");
            }
        }
    }
    Ok(())
}
