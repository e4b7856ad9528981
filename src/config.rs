//! Configuration: defaults, then `ledgerlake.toml`, then `LEDGERLAKE_*` environment
//! variables, then command-line flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ledgerlake_ingest::WriterConfig;
use ledgerlake_lakehouse::LakeConfig;
use serde::{Deserialize, Serialize};

/// Flags shared by the commands that open the lake.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Configuration file (missing is fine).
    #[arg(long, default_value = "ledgerlake.toml")]
    pub config: PathBuf,
    /// Where the lake lives: a directory, file:// or s3://bucket/prefix.
    #[arg(long)]
    pub data: Option<String>,
    /// Address of the HTTP API.
    #[arg(long)]
    pub http: Option<String>,
    /// Address of Arrow Flight SQL and Flight (gRPC).
    #[arg(long)]
    pub flight: Option<String>,
    /// Local state (dedupe index, API keys); default: <data>/_ledgerlake for a local lake.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A file holding the admin API key (or set LEDGERLAKE_ADMIN_KEY to the key); otherwise
    /// one is generated on first start and stored in the state dir. Keys are never taken on
    /// the command line, where `ps` shows them to everyone on the machine.
    #[arg(long, value_name = "FILE")]
    pub admin_key_file: Option<PathBuf>,
    /// Where the model runs: cpu, cuda or cuda:N (CUDA needs `--features cuda`).
    #[arg(long)]
    pub device: Option<String>,
    /// The base model to serve: a GGUF file (e.g. from `scripts/fetch-model`), a Hugging
    /// Face checkpoint directory, or an object-store URI of such a directory (default: the shipped
    /// ledgerlake-base).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The name the base model answers to (default: its file or directory name as a
    /// model id, e.g. smollm2-135m-instruct.q4_1).
    #[arg(long)]
    pub model_name: Option<String>,
}

/// A secret of the configuration (the admin key, the EVM key): read and written as
/// itself, never shown by `Debug`, so no log or panic message carries it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

impl Secret {
    /// The key in `path` (surrounding whitespace dropped). A file others may read is
    /// used, with a warning, as ssh would not.
    pub fn from_file(path: &Path) -> Result<Secret> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the key file {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0);
            if mode & 0o077 != 0 {
                eprintln!("warning: the key file {} may be read by others (mode {:o}); chmod 600 it", path.display(), mode & 0o777);
            }
        }
        let key = text.trim();
        anyhow::ensure!(!key.is_empty(), "the key file {} is empty", path.display());
        Ok(Secret(key.to_owned()))
    }

    /// A command's key: from `file` when given, else from the environment variable `env`
    /// (the key itself). Never from the command line.
    pub fn from_file_or_env(file: Option<&Path>, env: &str, flag: &str) -> Result<Secret> {
        if let Some(path) = file {
            return Secret::from_file(path);
        }
        match std::env::var(env) {
            Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_owned())),
            _ => anyhow::bail!("no key: give {flag} FILE or set {env}"),
        }
    }
}

/// A participant's signing key (contributions, reviews, registrations): `--key-file` or
/// LEDGERLAKE_SIGNING_KEY.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SigningKeyArgs {
    /// A file holding the signing private key (0x + 64 hex digits; `ledgerlake keys new
    /// --out FILE` makes one); or set LEDGERLAKE_SIGNING_KEY to the key. Keys are never
    /// taken on the command line, where `ps` shows them.
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

impl SigningKeyArgs {
    pub fn load(&self) -> Result<ledgerlake_ingest::sign::Keypair> {
        let key = Secret::from_file_or_env(self.key_file.as_deref(), "LEDGERLAKE_SIGNING_KEY", "--key-file")?;
        ledgerlake_ingest::sign::Keypair::from_hex(key.expose()).map_err(anyhow::Error::msg)
    }
}

/// The key an EVM transaction is sent from: `--key-file` or LEDGERLAKE_EVM_KEY.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EvmKeyArgs {
    /// A file holding the sending account's private key (hex); or set LEDGERLAKE_EVM_KEY to
    /// the key. Keys are never taken on the command line, where `ps` shows them.
    #[arg(long = "key-file", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

impl EvmKeyArgs {
    pub fn load(&self) -> Result<Secret> {
        Secret::from_file_or_env(self.key_file.as_deref(), "LEDGERLAKE_EVM_KEY", "--key-file")
    }
}

/// An amount written as a string or as a number (`LEDGERLAKE_BASE_PRICE_PER_1K_INPUT=1000`
/// reads as a number), kept as its decimal digits.
fn digits<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Digits {
        Text(String),
        Number(u64),
    }
    Ok(match Digits::deserialize(d)? {
        Digits::Text(s) => s,
        Digits::Number(n) => n.to_string(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub data: String,
    pub http: String,
    pub flight: String,
    pub state_dir: Option<PathBuf>,
    pub admin_key: Option<Secret>,
    /// A file holding the admin key (read when `admin_key` is not set).
    pub admin_key_file: Option<PathBuf>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest an event waits for its group commit, in milliseconds.
    pub flush_max_delay_ms: u64,
    /// A group commit starts once this many events wait.
    pub flush_max_rows: usize,
    /// Events queued but not yet durable before ingest answers 503.
    pub max_queued_rows: usize,
    /// Memory one SQL query may use before spilling or failing, in MiB.
    pub query_memory_mb: usize,
    /// Longest a SQL query may run, in seconds.
    pub query_timeout_s: u64,
    /// Most rows a JSON answer of `POST /v1/sql` holds (streaming formats have no limit).
    pub sql_json_row_limit: usize,
    /// Most bytes a JSON answer of `POST /v1/sql` holds (it is built whole before it is sent).
    pub sql_json_byte_limit: usize,
    /// Queries (HTTP and Flight) one API key may run at once; one more answers 429.
    pub sql_queries_per_key: usize,
    /// Bytes one answer to a non-admin key may stream (HTTP and Flight); past it the
    /// stream ends with an error.
    pub sql_answer_byte_limit: u64,
    /// The base model: a GGUF file or a Hugging Face checkpoint directory (default: the
    /// shipped one).
    pub model: Option<PathBuf>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The name the base model answers to in the OpenAI API (default: derived from the
    /// model's file or directory name).
    pub model_name: Option<String>,
    /// Sequences decoded together in one step.
    pub max_running: usize,
    /// Distinct LoRA adapters active in one batch.
    pub max_loras: usize,
    /// LoRA adapters kept loaded in memory (least recently used evicted).
    pub max_cpu_loras: usize,
    /// Generation requests waiting beyond the running ones before the API answers 429.
    pub max_waiting: usize,
    /// Training jobs waiting (beyond the one running) before `POST /v1/training/jobs`
    /// answers 503.
    pub max_training_jobs: usize,
    /// Store every answer's prompt and output token ids (the `inference_tokens` table),
    /// which attribution reads. Off: only the counts and the output's hash are stored.
    pub record_tokens: bool,
    /// Days `inference_tokens` keeps a row: older date partitions are deleted hourly by
    /// `up` (and by `ledgerlake maintenance expire`). 0 keeps them forever.
    pub token_retention_days: u32,
    /// Seconds between two passes of `up`'s attribution job (0: no job; run `ledgerlake
    /// attribute run` instead).
    pub attribution_interval_s: u64,
    /// How attribution's methods share an inference's weight where they have evidence
    /// (`spans`, `gradient`, `retrieval`: relative integer shares; 0 turns one off).
    pub attribution_mix: ledgerlake_attribution::Mix,
    /// Per model id, a mix that replaces `attribution_mix` for that model's inferences.
    pub attribution_models: std::collections::BTreeMap<String, ledgerlake_attribution::Mix>,
    /// The gradient method's kernel: `datainf` (default), `trak` or `graddot`.
    pub attribution_kernel: String,
    /// Seconds between two updates of the retrieval index (BM25 over public datanets'
    /// snapshots, for requests with `"ledgerlake": {"datanets": [...]}`); 0: no retrieval.
    pub retrieval_interval_s: u64,
    /// Fee of the base model per 1,000 prompt tokens, in base units (10^18 = 1 OPEN).
    #[serde(deserialize_with = "digits")]
    pub base_price_per_1k_input: String,
    /// Fee of the base model per 1,000 completion tokens, in base units.
    #[serde(deserialize_with = "digits")]
    pub base_price_per_1k_output: String,
    /// Reward epochs (docs/epochs.md): the start of epoch 0 (RFC 3339) and each epoch's
    /// length in seconds.
    pub epoch_genesis: String,
    pub epoch_length_s: u64,
    /// Seconds after its window ends before an epoch may close (time for the attribution
    /// job to score the window's last answers).
    pub epoch_grace_s: u64,
    /// The split policy until governance sets it: each role's share of a fee in basis
    /// points (summing to 10,000), and the treasury's address, which also takes what has
    /// no recipient.
    pub treasury: String,
    pub treasury_bps: u32,
    pub builder_bps: u32,
    pub stakers_bps: u32,
    pub contributors_bps: u32,
    /// Where epoch roots are anchored: `log` (the hash-chained `anchors` table) or `evm`
    /// (the `EpochAnchor` contract at `evm_anchor` on `evm_rpc_url`, sent from `evm_key`).
    pub anchor: String,
    pub evm_rpc_url: Option<String>,
    pub evm_key: Option<Secret>,
    /// A file holding the anchoring key (read when `evm_key` is not set).
    pub evm_key_file: Option<PathBuf>,
    pub evm_anchor: Option<String>,
    /// The `OpenStaking` contract on `evm_rpc_url` whose stakes `up` follows into
    /// `stake_changed` (then no key records stakes); none: stakes are an admin's records.
    pub evm_staking: Option<String>,
    /// Blocks a staking event waits under the chain's head before it is followed (a reorg
    /// deeper than this is not undone).
    pub evm_confirmations: u64,
    /// Seconds between two looks at the staking contract.
    pub stake_poll_interval_s: u64,
    /// Milliseconds a close waits between anchoring and recording the epoch (0). Only for
    /// tests that kill the process in between.
    pub epoch_pause_after_anchor_ms: u64,
    /// Where adapters may be read from, comma-separated: local directories and object-store
    /// prefixes (`s3://bucket/prefix`). ModelFactory's own `<lake>_models/` is always one.
    /// A registration or a `lora_path` elsewhere is refused (docs/security.md).
    pub adapter_roots: String,
    /// Most bytes one adapter's files may hold.
    pub adapter_max_bytes: u64,
    /// How far a participant event's `event_time` may be from the server's clock, either
    /// way, in seconds (docs/security.md).
    pub max_event_skew_s: u64,
    /// The EVM chain participants sign for (the EIP-712 domain's `chainId`), when the
    /// deployment has one.
    pub chain_id: Option<u64>,
    /// Whether `up` closes each epoch on its own once its window and grace have passed
    /// (false: epochs close by `ledgerlake epoch close`). The first it closes is the last
    /// that may close when it starts, which takes every earlier fee.
    pub epoch_auto_close: bool,
}

impl Default for Config {
    fn default() -> Self {
        let w = WriterConfig::default();
        let q = ledgerlake_sql::QueryLimits::default();
        Self {
            data: "./data".into(),
            http: "127.0.0.1:7070".into(),
            flight: "127.0.0.1:7071".into(),
            state_dir: None,
            admin_key: None,
            admin_key_file: None,
            max_body_bytes: 64 * 1024 * 1024,
            flush_max_delay_ms: w.max_delay.as_millis() as u64,
            flush_max_rows: w.max_rows,
            max_queued_rows: w.max_queued_rows,
            query_memory_mb: q.memory_bytes >> 20,
            query_timeout_s: q.timeout.as_secs(),
            sql_json_row_limit: 100_000,
            sql_json_byte_limit: 64 << 20,
            sql_queries_per_key: q.per_key,
            sql_answer_byte_limit: q.answer_bytes,
            model: None,
            device: "cpu".into(),
            model_name: None,
            max_running: 32,
            max_loras: 32,
            max_cpu_loras: 128,
            max_waiting: 1024,
            max_training_jobs: 64,
            record_tokens: true,
            token_retention_days: 90,
            attribution_interval_s: 30,
            attribution_mix: ledgerlake_attribution::Mix::default(),
            attribution_models: Default::default(),
            attribution_kernel: "datainf".into(),
            retrieval_interval_s: 10,
            base_price_per_1k_input: "1000000000000000".into(),
            base_price_per_1k_output: "2000000000000000".into(),
            epoch_genesis: "2026-01-01T00:00:00Z".into(),
            epoch_length_s: 86_400,
            epoch_grace_s: 3_600,
            treasury: TREASURY.into(),
            treasury_bps: 1_000,
            builder_bps: 3_000,
            stakers_bps: 1_000,
            contributors_bps: 5_000,
            anchor: "log".into(),
            evm_rpc_url: None,
            evm_key: None,
            evm_key_file: None,
            evm_anchor: None,
            evm_staking: None,
            evm_confirmations: 12,
            stake_poll_interval_s: 5,
            epoch_pause_after_anchor_ms: 0,
            epoch_auto_close: false,
            adapter_roots: String::new(),
            adapter_max_bytes: 1 << 30,
            max_event_skew_s: w.max_event_skew.as_secs(),
            chain_id: None,
        }
    }
}

/// The default treasury: a placeholder address no one holds the key of. Set `treasury`
/// to the protocol treasury's address before paying real rewards.
pub const TREASURY: &str = "0x000000000000000000000000000000000000da0a";

impl Config {
    /// How epochs are cut and paid.
    pub fn epochs(&self) -> Result<ledgerlake_attribution::epoch_job::EpochConfig> {
        let genesis = chrono::DateTime::parse_from_rfc3339(&self.epoch_genesis)
            .with_context(|| format!("epoch_genesis {:?} is not an RFC 3339 time", self.epoch_genesis))?
            .with_timezone(&chrono::Utc);
        // A century bounds both, so every window and close time is a calendar date.
        const CENTURY_S: u64 = 100 * 366 * 86_400;
        anyhow::ensure!((1..=CENTURY_S).contains(&self.epoch_length_s), "epoch_length_s must be 1 to {CENTURY_S} seconds");
        anyhow::ensure!(self.epoch_grace_s <= CENTURY_S, "epoch_grace_s must be at most {CENTURY_S} seconds");
        let policy = ledgerlake_attribution::epochs::Policy {
            treasury: self.treasury.parse().map_err(|e| anyhow::anyhow!("treasury {:?}: {e}", self.treasury))?,
            treasury_bps: self.treasury_bps,
            builder_bps: self.builder_bps,
            stakers_bps: self.stakers_bps,
            contributors_bps: self.contributors_bps,
        };
        policy.check()?;
        Ok(ledgerlake_attribution::epoch_job::EpochConfig { genesis, length_s: self.epoch_length_s, grace_s: self.epoch_grace_s, policy })
    }

    pub fn load(args: &ConfigArgs) -> Result<Self> {
        let mut config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(&args.config))
            .merge(Env::prefixed("LEDGERLAKE_").only(&[
                "data",
                "http",
                "flight",
                "state_dir",
                "admin_key",
                "admin_key_file",
                "max_body_bytes",
                "flush_max_delay_ms",
                "max_event_skew_s",
                "adapter_roots",
                "adapter_max_bytes",
                "chain_id",
                "flush_max_rows",
                "max_queued_rows",
                "query_memory_mb",
                "query_timeout_s",
                "sql_json_row_limit",
                "sql_json_byte_limit",
                "sql_queries_per_key",
                "sql_answer_byte_limit",
                "model",
                "device",
                "model_name",
                "max_running",
                "max_loras",
                "max_cpu_loras",
                "max_waiting",
                "max_training_jobs",
                "record_tokens",
                "token_retention_days",
                "attribution_interval_s",
                "attribution_kernel",
                "retrieval_interval_s",
                "base_price_per_1k_input",
                "base_price_per_1k_output",
                "epoch_genesis",
                "epoch_length_s",
                "epoch_grace_s",
                "treasury",
                "treasury_bps",
                "builder_bps",
                "stakers_bps",
                "contributors_bps",
                "anchor",
                "evm_rpc_url",
                "evm_key",
                "evm_key_file",
                "evm_anchor",
                "evm_staking",
                "evm_confirmations",
                "stake_poll_interval_s",
                "epoch_pause_after_anchor_ms",
                "epoch_auto_close",
            ]))
            .extract()
            .with_context(|| format!("reading configuration ({} and LEDGERLAKE_*)", args.config.display()))?;
        if let Some(d) = &args.data {
            config.data = d.clone();
        }
        if let Some(h) = &args.http {
            config.http = h.clone();
        }
        if let Some(f) = &args.flight {
            config.flight = f.clone();
        }
        if let Some(s) = &args.state_dir {
            config.state_dir = Some(s.clone());
        }
        if let Some(f) = &args.admin_key_file {
            config.admin_key = Some(Secret::from_file(f)?);
        }
        // A key's file, for deployments that mount secrets as files.
        if let (None, Some(f)) = (&config.admin_key, &config.admin_key_file) {
            config.admin_key = Some(Secret::from_file(f)?);
        }
        if let (None, Some(f)) = (&config.evm_key, &config.evm_key_file) {
            config.evm_key = Some(Secret::from_file(f)?);
        }
        if let Some(d) = &args.device {
            config.device = d.clone();
        }
        if let Some(m) = &args.model {
            config.model = Some(m.clone());
        }
        if let Some(n) = &args.model_name {
            config.model_name = Some(n.clone());
        }
        Ok(config)
    }

    pub fn lake(&self) -> Result<LakeConfig> {
        Ok(LakeConfig::parse(&self.data)?)
    }

    /// The local state directory: under the lake for a local lake, else under
    /// `./ledgerlake-state/` named after the lake URL.
    pub fn state_dir(&self) -> Result<PathBuf> {
        if let Some(s) = &self.state_dir {
            return Ok(s.clone());
        }
        let lake = self.lake()?;
        Ok(match lake.local_dir() {
            Some(dir) => dir.join("_ledgerlake"),
            None => {
                let name: String = lake
                    .root
                    .as_str()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
                    .collect();
                PathBuf::from("ledgerlake-state").join(name)
            }
        })
    }

    pub fn query_limits(&self) -> ledgerlake_sql::QueryLimits {
        ledgerlake_sql::QueryLimits {
            memory_bytes: self.query_memory_mb.max(1) << 20,
            timeout: Duration::from_secs(self.query_timeout_s.max(1)),
            per_key: self.sql_queries_per_key.max(1),
            answer_bytes: self.sql_answer_byte_limit.max(1),
        }
    }

    /// The adapter roots: ModelFactory's `<lake>_models/` and the configured ones.
    pub fn adapter_roots(&self) -> Result<ledgerlake_serving::roots::AdapterRoots> {
        let lake = self.lake()?;
        let mut roots = vec![format!("{}_models/", lake.root)];
        roots.extend(self.adapter_roots.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_owned));
        ledgerlake_serving::roots::AdapterRoots::new(&roots, self.adapter_max_bytes).map_err(anyhow::Error::msg)
    }

    pub fn writer(&self) -> WriterConfig {
        WriterConfig {
            max_delay: Duration::from_millis(self.flush_max_delay_ms),
            max_rows: self.flush_max_rows,
            max_queued_rows: self.max_queued_rows,
            max_event_skew: Duration::from_secs(self.max_event_skew_s),
            chain_id: self.chain_id,
            staking: self.evm_staking.clone(),
            ..WriterConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key comes from its file (trimmed) or the environment, and nothing else.
    #[test]
    fn keys_come_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, "  0xabc\n").unwrap();
        assert_eq!(Secret::from_file_or_env(Some(&file), "LEDGERLAKE_TEST_UNSET_KEY", "--key-file").unwrap().expose(), "0xabc");
        std::fs::write(&file, "\n").unwrap();
        assert!(Secret::from_file(&file).unwrap_err().to_string().contains("is empty"));
        assert!(Secret::from_file(&dir.path().join("missing")).is_err());
        let none = Secret::from_file_or_env(None, "LEDGERLAKE_TEST_UNSET_KEY", "--key-file").unwrap_err();
        assert!(none.to_string().contains("give --key-file FILE or set LEDGERLAKE_TEST_UNSET_KEY"), "{none}");
    }

    /// Prices read from the environment arrive as numbers; they are kept as digits.
    #[test]
    fn prices_may_be_numbers_or_strings() {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("base_price_per_1k_input = 1000\nbase_price_per_1k_output = \"340282366920938463463374607431768211455\""))
            .extract()
            .unwrap();
        assert_eq!(config.base_price_per_1k_input, "1000");
        assert_eq!(config.base_price_per_1k_output, "340282366920938463463374607431768211455");
    }

    /// `Debug` of the configuration (what a log or panic prints) never holds its keys.
    #[test]
    fn debug_redacts_the_keys() {
        let config = Config {
            admin_key: Some(Secret("llk_admin_the-admin-secret".into())),
            evm_key: Some(Secret("0x4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d".into())),
            ..Config::default()
        };
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("the-admin-secret") && !shown.contains("4f3edf983ac6"), "{shown}");
        assert_eq!(config.admin_key.as_ref().map(Secret::expose), Some("llk_admin_the-admin-secret"));
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("llk_admin_the-admin-secret"), "serialized as itself");
    }
}
