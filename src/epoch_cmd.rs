//! `ledgerlake epoch ...` and `ledgerlake anchor verify`: reward epochs from the command
//! line. Reading commands open the lake; `close` asks a running server (it writes through
//! the server's ingest writer). Glue only: `ledgerlake_attribution::epoch_job` does the work.

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use ledgerlake_attribution::anchor::{self, LogAnchor};
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
}

impl Anchors {
    pub fn from_config(_config: &Config) -> Result<Self> {
        Ok(Anchors::Log(LogAnchor))
    }

    /// Closes epoch `n` with this anchor.
    pub async fn close(
        &self,
        lake: &Lake,
        config: &EpochConfig,
        n: u64,
        now: DateTime<Utc>,
        send: impl AsyncFn(Vec<Event>) -> Result<(), ledgerlake_attribution::Error>,
    ) -> Result<Closing, ledgerlake_attribution::Error> {
        match self {
            Anchors::Log(a) => epoch_job::close(lake, config, n, now, a, send).await,
        }
    }

    /// What is wrong with a closed epoch's anchoring (nothing: empty).
    pub async fn check(&self, lake: &Lake, row: &EpochClosed) -> Result<Vec<String>, ledgerlake_attribution::Error> {
        let reference = row.anchor.clone().unwrap_or_default();
        if reference.starts_with("log:") {
            return check_log(lake, row).await;
        }
        Ok(vec![format!("epoch {}: anchor reference {reference:?} is not one this server checks", row.epoch)])
    }
}

/// The log entry of a closed epoch holds its root and manifest hash, the reference names
/// it, and the chain up to it verifies.
async fn check_log(lake: &Lake, row: &EpochClosed) -> Result<Vec<String>, ledgerlake_attribution::Error> {
    let entries = anchor::entries(lake).await?;
    let mut problems = anchor::verify_log(&entries).problems;
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
    Ok(problems)
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
        EpochCommand::Close { n, server } => {
            let url = format!("{}/v1/epochs/{n}/close", server.server.trim_end_matches('/'));
            let resp = reqwest::Client::new().post(&url).bearer_auth(server.key()?).send().await.with_context(|| format!("POST {url}"))?;
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

pub async fn anchor(command: AnchorCommand) -> Result<()> {
    match command {
        AnchorCommand::Verify { config } => {
            let config = Config::load(&config)?;
            let lake = Lake::new(config.lake()?);
            let entries = anchor::entries(&lake).await?;
            let mut report = anchor::verify_log(&entries);
            let recorded = epoch_job::recorded(&lake).await?;
            for e in &entries {
                match recorded.get(&e.epoch).and_then(|r| r.closed.as_ref()) {
                    Some(row) => {
                        for p in check_log(&lake, row).await? {
                            if !report.problems.contains(&p) {
                                report.problems.push(p);
                            }
                        }
                    }
                    None => report.problems.push(format!("epoch {}: logged but not closed", e.epoch)),
                }
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.problems.is_empty() {
                bail!("the anchor log does not verify");
            }
        }
    }
    Ok(())
}
