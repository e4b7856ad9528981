//! `ledgerlake`: the command line. Flag parsing and wiring only; every rule lives in the
//! library crates.

mod api;
mod attribute_cmd;
mod attribution_http;
mod bench;
mod bench_epoch;
mod bench_finetune;
mod bench_gradient;
mod bench_job;
mod bench_serving;
mod bench_spans;
mod bench_sql;
mod client;
mod config;
mod epoch_cmd;
mod epoch_http;
mod evm;
mod eval_attribution;
mod finetune_cmd;
mod gradient_job;
mod model_cmd;
mod retrieval_job;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ledgerlake_ingest::demo::Workload;
use ledgerlake_ingest::sign::Keypair;
use ledgerlake_ingest::validate::event_to_json;
use ledgerlake_ingest::{ApiKeys, Ingestor, http};
use ledgerlake_lakehouse::events::{EventKind, Verdict};
use ledgerlake_lakehouse::ids::ContributionId;
use ledgerlake_lakehouse::{Event, Lake};

use crate::config::{Config, ConfigArgs};

#[derive(Parser)]
#[command(name = "ledgerlake", version, about = "An open, verifiable attribution ledger for AI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve everything (ingest HTTP API) on the embedded defaults.
    Up {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Bulk-load NDJSON or Parquet files of events into a running server.
    Ingest {
        /// `.ndjson`/`.jsonl` files (one event per line) or `.parquet` files (one kind each).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Kind of the events of Parquet files that have no `kind` column.
        #[arg(long)]
        kind: Option<String>,
        /// Events per request.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Run a read-only SQL query over the lake and print the result.
    ///
    /// Tables: one per event kind (`fee_charged`, `inference_completed`, ...), the views of
    /// `sql/views/`, and time travel with `at_version('table', N)` or
    /// `at_timestamp('table', '2026-11-24T10:00:00Z')`.
    Sql {
        /// The query, e.g. "SELECT model_id, sum(amount) FROM fee_charged GROUP BY 1".
        query: String,
        /// Output: table, csv, json, ndjson, parquet or arrow (IPC stream).
        #[arg(long, default_value = "table")]
        format: ledgerlake_sql::Format,
        /// Ask a running `ledgerlake up` (POST /v1/sql) instead of reading the lake here.
        #[arg(long, env = "LEDGERLAKE_SERVER")]
        server: Option<String>,
        /// A file holding the API key for --server (or set LEDGERLAKE_API_KEY); default: the
        /// admin key of a local lake in ./data.
        #[arg(long, value_name = "FILE")]
        api_key_file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List the tables of the lake with their version, files and rows.
    Tables {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Fill a running server with a realistic synthetic workload, or print it as NDJSON.
    Demo {
        /// Write N events as NDJSON to standard output instead of sending them.
        #[arg(long, value_name = "N")]
        ndjson: Option<usize>,
        /// Events to send to the server.
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// With --ndjson: when the workload starts (RFC 3339; default now). Participant
        /// events are signed for a time, and a server takes them within its skew bound.
        #[arg(long)]
        start: Option<chrono::DateTime<chrono::Utc>>,
        #[command(flatten)]
        deployment: client::DeploymentArgs,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Turn `.txt`, `.md`, `.pdf` and `.docx` files into signed contributions to a datanet:
    /// text split into chunks on paragraph boundaries, one `contribution.submitted` per
    /// chunk (source `<file>#<chunk>`). Sending the same files again changes nothing.
    Contribute {
        #[arg(long)]
        datanet: String,
        /// The contributor's key.
        #[command(flatten)]
        key: config::SigningKeyArgs,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest chunk, in bytes of UTF-8 text (at most 262144, the contract's limit).
        #[arg(long, default_value_t = 2000)]
        chunk_bytes: usize,
        /// SPDX licence the contributions are given under.
        #[arg(long, default_value = "CC-BY-4.0")]
        license: String,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Datanets as the lake says they are.
    Datanet {
        #[command(subcommand)]
        command: DatanetCommand,
    },
    /// Make and use keys for signing contributions and reviews.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Sign a participant's event (EIP-712 typed data under the deployment's domain,
    /// docs/events.md) and print it, ready to send.
    Sign {
        /// The signer's key.
        #[command(flatten)]
        key: config::SigningKeyArgs,
        /// URL of a running `ledgerlake up` to ask the deployment of (unless --deployment).
        #[arg(long, env = "LEDGERLAKE_SERVER", default_value = "http://127.0.0.1:7070")]
        server: String,
        #[command(flatten)]
        deployment: client::DeploymentArgs,
        #[command(subcommand)]
        what: SignCommand,
    },
    /// Void an event (admin key): it stays stored, but reward epochs closed from now on
    /// do not count it, and their recompute agrees (incident response, docs/security.md).
    Void {
        /// The id of the stored event.
        event_id: String,
        /// Its kind, e.g. fee.charged.
        #[arg(long)]
        kind: String,
        /// Why it no longer counts (recorded).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Manage API keys of a running server (needs the admin key).
    Apikey {
        /// Role of the new key: admin, service, builder, ingest or read.
        #[arg(long)]
        role: String,
        /// The address the key acts as: a builder key trains as it (required), a read or
        /// ingest key reads its private datanets (optional).
        #[arg(long)]
        address: Option<String>,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Table maintenance.
    Maintenance {
        #[command(subcommand)]
        command: MaintenanceCommand,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (the one `GET /openapi.json` serves).
    Openapi,
    /// The serving spool: completions' billing events waiting for the lake, and the
    /// quarantine of files that could not be read or were refused.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Pretrain the default base model, or try a model from the command line.
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// Proof of attribution: which contributions shaped an answer.
    Attribute {
        #[command(subcommand)]
        command: attribute_cmd::AttributeCommand,
    },
    /// Reward epochs: close, show, recompute, verify, proofs (docs/epochs.md).
    Epoch {
        #[command(subcommand)]
        command: epoch_cmd::EpochCommand,
    },
    /// The EVM chain: deploy ledgerlake's contracts, claim rewards.
    Chain {
        #[command(subcommand)]
        command: epoch_cmd::ChainCommand,
    },
    /// The anchors of epoch roots.
    Anchor {
        #[command(subcommand)]
        command: epoch_cmd::AnchorCommand,
    },
    /// Measure attribution on planted ground truth (canaries, fine-tuned facts, LDS).
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Benchmarks (numbers go into BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Canaries (spans), fine-tuned facts (gradient top-10) and LDS against retrained
    /// adapters, with Grad-Dot and TRAK baselines.
    Attribution(eval_attribution::Options),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new secp256k1 key. With --out, the private key goes to that file (created
    /// new, mode 0600) and only the address and the file are printed; without, both are
    /// printed.
    New {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The envelope of an event signed from the command line.
#[derive(clap::Args)]
struct EnvelopeArgs {
    /// The event id (default: a new random one).
    #[arg(long)]
    event_id: Option<String>,
    /// When it happens (RFC 3339; default: now).
    #[arg(long)]
    event_time: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Subcommand)]
enum SignCommand {
    /// A `contribution.submitted` of content to a datanet; prints the event with its
    /// signature, content hash and contribution id.
    Contribution {
        #[arg(long)]
        datanet: String,
        /// File holding the exact content (UTF-8).
        #[arg(long, conflicts_with = "content")]
        content_file: Option<PathBuf>,
        #[arg(long)]
        content: Option<String>,
        /// SPDX licence the content is given under.
        #[arg(long, default_value = "CC-BY-4.0")]
        license: String,
        #[command(flatten)]
        envelope: EnvelopeArgs,
    },
    /// A `contribution.reviewed`: a verdict (approved, rejected, flagged) on a contribution.
    Review {
        #[arg(long)]
        contribution: String,
        #[arg(long)]
        datanet: String,
        #[arg(long)]
        verdict: String,
        /// Why (required unless approved).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        envelope: EnvelopeArgs,
    },
    /// Any participant event given as JSON (with `kind`; `event_id` and `event_time` are
    /// filled in when absent): prints it signed.
    Event {
        /// The event's JSON (`-` reads it from standard input).
        json: String,
    },
}

#[derive(Subcommand)]
enum DatanetCommand {
    /// A datanet's owner, status and visibility, and its snapshot `D@V` (docs/datanets.md):
    /// version, contributions, contributors and bytes. `D` alone is the newest version.
    Show {
        /// `D` or `D@V` (V: a version of the contribution_reviewed table).
        snapshot: String,
        /// Print JSON, with the snapshot's contribution ids.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// How many files wait, and every quarantined file with its reason.
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Move quarantined files (by name, or all with --all) back into the spool once they
    /// read; a running server forwards them (their event ids make a replay harmless).
    Redrive {
        names: Vec<String>,
        #[arg(long, conflicts_with = "names")]
        all: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum MaintenanceCommand {
    /// Rewrite small files into large ones (Delta OPTIMIZE).
    Compact {
        #[arg(long)]
        table: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Delete the rows of `inference_tokens` older than the retention (whole days).
    Expire {
        /// Keep this many days (default: `token_retention_days`).
        #[arg(long)]
        days: Option<u32>,
        /// Delete the days before this date (YYYY-MM-DD) instead.
        #[arg(long, conflicts_with = "days")]
        before: Option<chrono::NaiveDate>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Delete files no table version references any more, older than the retention.
    Vacuum {
        #[arg(long)]
        table: Option<String>,
        #[arg(long, default_value_t = 168)]
        retention_hours: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEDGERLAKE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ledgerlake=info,ledgerlake_ingest=info,ledgerlake_lakehouse=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Up { config } => up(Config::load(&config)?).await,
        Command::Ingest { files, kind, batch, server } => client::ingest_files(&server, &files, kind.as_deref(), batch).await,
        Command::Tables { config } => tables(&Config::load(&config)?).await,
        Command::Contribute { datanet, key, files, chunk_bytes, license, server } => {
            client::contribute(&server, &key.load()?, &datanet, &files, chunk_bytes, &license).await
        }
        Command::Datanet { command: DatanetCommand::Show { snapshot, json, config } } => {
            datanet_show(&Config::load(&config)?, &snapshot, json).await
        }
        Command::Sql { query, format, server: Some(server), api_key_file, .. } => {
            client::sql(&client::ServerArgs { server, api_key_file }, &query, format).await
        }
        Command::Sql { query, format, server: None, config, .. } => sql(&Config::load(&config)?, &query, format).await,
        Command::Demo { ndjson: Some(n), seed, start, deployment, server, .. } => {
            let deployment = deployment.resolve(&server.server).await?;
            let start = start.unwrap_or_else(chrono::Utc::now);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for event in Workload::for_deployment(seed, deployment, start).events(n) {
                serde_json::to_writer(&mut out, &event_to_json(&event))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            Ok(())
        }
        // Sent to a server: signed for its deployment, timed now.
        Command::Demo { ndjson: None, events, seed, server, .. } => client::demo(&server, events, seed).await,
        Command::Keys { command: KeysCommand::New { out } } => {
            let k = Keypair::random();
            match out {
                Some(path) => {
                    write_private(&path, format!("{}\n", k.private_key_hex()).as_bytes())?;
                    println!("address: {}\nkey_file: {}", k.address(), path.display());
                }
                None => println!("address: {}\nprivate_key: {}", k.address(), k.private_key_hex()),
            }
            Ok(())
        }
        Command::Sign { key, server, deployment, what } => sign(&key.load()?, &deployment.resolve(&server).await?, what),
        Command::Void { event_id, kind, reason, server } => client::void(&server, &event_id, &kind, &reason).await,
        Command::Apikey { role, address, server } => client::create_api_key(&server, &role, address.as_deref()).await,
        Command::Maintenance { command } => maintenance(command).await,
        Command::Spool { command } => spool(command),
        Command::Openapi => {
            println!("{}", api::document().to_pretty_json()?);
            Ok(())
        }
        Command::Model { command: model_cmd::ModelCommand::Finetune(args) } => finetune_cmd::run(*args).await,
        Command::Model { command } => tokio::task::block_in_place(|| model_cmd::run(command)),
        Command::Attribute { command } => attribute_cmd::run(command).await,
        Command::Epoch { command } => epoch_cmd::run(command).await,
        Command::Anchor { command } => epoch_cmd::anchor(command).await,
        Command::Chain { command } => epoch_cmd::chain(command).await,
        Command::Eval { command: EvalCommand::Attribution(opts) } => tokio::task::block_in_place(|| eval_attribution::run(opts)),
        Command::Bench { command } => bench::run(command).await,
    }
}

async fn up(config: Config) -> Result<()> {
    let lake = Lake::new(config.lake()?);
    let state_dir = config.state_dir()?;
    let (keys, generated) = ApiKeys::open(&state_dir, config.admin_key.as_ref().map(|k| k.expose()))?;
    let ingestor = Ingestor::start(lake.clone(), state_dir.join("index"), config.writer())
        .await
        .with_context(|| format!("starting the writer on {}", lake.config().root))?;
    let keys = Arc::new(keys);
    let keys_for_serving = keys.clone();
    let keys_for_training = keys.clone();
    let keys_for_flight = keys.clone();
    let state = http::IngestState { ingestor: ingestor.clone(), keys: keys.clone(), max_body_bytes: config.max_body_bytes };
    let engine = ledgerlake_sql::SqlEngine::new(lake.clone(), config.query_limits()).await?;
    let auth = Arc::new(Keys(keys));
    let sql = ledgerlake_sql::http::SqlState { engine: engine.clone(), auth: auth.clone(), json_row_limit: config.sql_json_row_limit, json_byte_limit: config.sql_json_byte_limit };
    let roots = Arc::new(config.adapter_roots()?);
    let served = serve::start(&config, &state_dir, ingestor.clone(), engine.clone(), roots.clone()).await?;
    if config.token_retention_days > 0 {
        tokio::spawn(expire_tokens_hourly(lake.clone(), config.token_retention_days));
    }
    let (serving, model_dir) = (served.engine, served.model_dir);
    let base_name = serving.base_name().to_owned();
    if config.attribution_interval_s > 0 {
        attribute_cmd::spawn_job(
            lake.clone(),
            attribute_cmd::index_dir(&state_dir, &base_name),
            served.tokenizer.clone(),
            attribute_cmd::Methods::new(&config, served.model.clone())?,
            ingestor.clone(),
            Duration::from_secs(config.attribution_interval_s),
        )?;
    }
    let explain = attribution_http::AttributionState { lake: lake.clone(), keys: keys_for_training.clone(), tokenizer: served.tokenizer.clone() };
    let epochs = epoch_http::EpochState {
        lake: lake.clone(),
        keys: keys_for_training.clone(),
        config: config.epochs()?,
        anchor: epoch_cmd::Anchors::from_config(&config)?,
        pause_after_anchor: Duration::from_millis(config.epoch_pause_after_anchor_ms),
        ingestor: ingestor.clone(),
        trees: Default::default(),
        closing: Default::default(),
    };
    if let Some(contract) = &config.evm_staking {
        let follower = evm::StakeFollower {
            rpc: config.evm_rpc_url.clone().context("evm_staking needs evm_rpc_url")?,
            contract: contract.parse().with_context(|| format!("evm_staking {contract:?} is not an address"))?,
            confirmations: config.evm_confirmations,
            chain_id: config.chain_id,
            cursor: state_dir.join("stake-follower.json"),
        };
        tokio::spawn(follower.run(ingestor.clone(), Duration::from_secs(config.stake_poll_interval_s.max(1))));
    }
    if config.epoch_auto_close {
        // Checked as often as epochs end, and at least once a minute.
        tokio::spawn(epochs.clone().close_due(Duration::from_secs(config.epoch_length_s.clamp(1, 60))));
    }
    let base = ledgerlake_factory::jobs::Base { model: served.model, tokenizer: served.tokenizer, name: base_name.clone() };
    let publisher = Arc::new(finetune_cmd::LakePublisher(ingestor.clone()));
    let jobs = ledgerlake_factory::Jobs::start(lake.clone(), base, state_dir.join("training"), publisher, config.max_training_jobs)?;
    let training = ledgerlake_factory::http::TrainingState { jobs, keys: keys_for_training };
    let adapters_dir = state_dir.join("adapters");
    let max_bytes = roots.max_bytes;
    let fetch: ledgerlake_serving::http::FetchAdapter = Arc::new(move |name: String, uri: String| {
        let dest = adapters_dir.join(name);
        Box::pin(async move { serve::fetch_dir(&uri, &dest, max_bytes).await })
    });
    let retriever: Option<Arc<dyn ledgerlake_serving::retrieval::Retriever>> = if config.retrieval_interval_s > 0 {
        let index = retrieval_job::start(lake.clone(), &state_dir, Duration::from_secs(config.retrieval_interval_s))?;
        Some(Arc::new(retrieval_job::IndexRetriever(index)))
    } else {
        None
    };
    let serving = ledgerlake_serving::http::ServingState { engine: serving, keys: keys_for_serving, fetch: Some(fetch), retriever, roots };
    let app = http::router(state).merge(ledgerlake_sql::http::router(sql)).merge(ledgerlake_serving::http::router(serving))
        .merge(ledgerlake_factory::http::router(training))
        .merge(attribution_http::router(explain))
        .merge(epoch_http::router(epochs))
        .merge(api::router()?);
    let listener = tokio::net::TcpListener::bind(&config.http)
        .await
        .with_context(|| format!("binding {}", config.http))?;
    let addr = listener.local_addr()?;
    let flight_listener = tokio::net::TcpListener::bind(&config.flight)
        .await
        .with_context(|| format!("binding {}", config.flight))?;
    let flight_addr = flight_listener.local_addr()?;
    let flight = ledgerlake_sql::flight::FlightState {
        engine,
        auth,
        sink: Arc::new(IngestSink(ingestor, keys_for_flight)),
        max_message_bytes: config.max_body_bytes,
    };
    println!("ledgerlake {} is up", env!("CARGO_PKG_VERSION"));
    println!("  lake:    {}", lake.config().root);
    println!("  state:   {}", state_dir.display());
    println!("  http:    http://{addr}  (POST /v1/events, POST /v1/sql, GET /health)");
    println!("  flight:  grpc://{flight_addr}  (Arrow Flight SQL and Flight)");
    println!("  openai:  http://{addr}/v1  (completions, chat/completions, models; model {base_name:?} from {})", model_dir.display());
    println!("  train:   http://{addr}/v1/training/jobs  (LoRA fine-tuning on datanets, builder keys)");
    // The key itself never goes to stdout (service logs keep stdout): only its 0600 file.
    match generated {
        Some(_) => println!("  admin key: generated, in {} (mode 0600)", state_dir.join("admin.key").display()),
        None if config.admin_key.is_some() => println!("  admin key: from configuration"),
        None => println!("  admin key: in {}", state_dir.join("admin.key").display()),
    }
    std::io::stdout().flush()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let flight_stopped = {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let http_stopped = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    };
    // Either server failing stops the process; a signal stops both gracefully.
    let http = async { axum::serve(listener, app).with_graceful_shutdown(http_stopped).await.context("serving HTTP") };
    let flight = async { ledgerlake_sql::flight::serve(flight_listener, flight, flight_stopped).await.context("serving Flight") };
    tokio::try_join!(http, flight)?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

async fn sql(config: &Config, query: &str, format: ledgerlake_sql::Format) -> Result<()> {
    use ledgerlake_sql::SqlEngine;
    let engine = SqlEngine::new(Lake::new(config.lake()?), config.query_limits()).await?;
    let stream = engine.query(query, Vec::new()).await?;
    ledgerlake_sql::format::write_stream(format, stream, std::io::BufWriter::new(std::io::stdout())).await?;
    Ok(())
}

/// Queries need an API key with at least the `read` role.
/// The SQL surfaces ask the ingest API keys who may query or store events.
struct Keys(Arc<ApiKeys>);

impl ledgerlake_sql::auth::Authorize for Keys {
    fn authorize(&self, key: Option<&str>, need: ledgerlake_sql::auth::Access) -> Result<ledgerlake_sql::auth::Reader, ledgerlake_sql::auth::Denied> {
        use ledgerlake_sql::auth::{Access, Denied, Reader};
        let role = match need {
            Access::Query => ledgerlake_ingest::Role::Read,
            // What a key may cause is decided per event by the authority of its kind.
            Access::Ingest => ledgerlake_ingest::Role::Read,
        };
        match self.0.authorize_key(key, role) {
            // Admins read every row; any other key what its id and address may (row-level
            // access, docs/security.md).
            Ok(p) if p.role == ledgerlake_ingest::Role::Admin => Ok(Reader::All),
            Ok(p) => Ok(Reader::Caller { key_id: p.id, address: p.address }),
            Err(e @ ledgerlake_ingest::Error::Forbidden { .. }) => Err(Denied::Forbidden(e.to_string())),
            Err(_) => Err(Denied::Unauthenticated("missing or unknown API key: send authorization: Bearer <key>".into())),
        }
    }
}

/// Flight `DoPut` stores events through the same ingest path as `POST /v1/events`.
struct IngestSink(Ingestor, Arc<ApiKeys>);

#[async_trait::async_trait]
impl ledgerlake_sql::flight::EventSink for IngestSink {
    async fn put(
        &self,
        batch: arrow::array::RecordBatch,
        kind: Option<String>,
        atomic: bool,
        key: &str,
    ) -> Result<ledgerlake_sql::flight::PutReceipt, ledgerlake_sql::flight::PutError> {
        use ledgerlake_ingest::Error as E;
        use ledgerlake_sql::flight::{PutError, PutReceipt};
        let kind = match kind.map(|k| k.parse::<EventKind>()).transpose() {
            Ok(k) => k,
            Err(e) => return Err(PutError::Invalid(e.to_string())),
        };
        // The gateway authenticated the key; who it is decides what its events may cause.
        let submitter = match self.1.authorize_key(Some(key), ledgerlake_ingest::Role::Read) {
            Ok(p) => ledgerlake_ingest::Submitter::Key(p),
            Err(e) => return Err(PutError::Invalid(e.to_string())),
        };
        match self.0.submit_arrow(batch, kind, atomic, submitter).await {
            Ok(r) => Ok(PutReceipt {
                accepted: r.accepted as u64,
                duplicates: r.duplicates as u64,
                errors: r.errors.iter().map(|e| serde_json::to_value(e).unwrap_or_default()).collect(),
            }),
            Err(E::Overloaded) => Err(PutError::Overloaded(E::Overloaded.to_string())),
            Err(e @ (E::MalformedBody(_) | E::BadRequest(_) | E::BatchTooLarge { .. } | E::PayloadTooLarge { .. })) => {
                Err(PutError::Invalid(e.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "storing a Flight DoPut batch");
                Err(PutError::Unavailable("storage is unavailable; nothing of this batch was acknowledged, retry".into()))
            }
        }
    }
}

async fn tables(config: &Config) -> Result<()> {
    let lake = Lake::new(config.lake()?);
    println!("{:<24} {:>8} {:>8} {:>12} {:>12}", "table", "version", "files", "rows", "bytes");
    for t in lake.tables().await? {
        let version = t.version.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<24} {:>8} {:>8} {:>12} {:>12}", t.kind.table(), version, t.files, t.rows, t.bytes);
    }
    Ok(())
}

async fn datanet_show(config: &Config, at: &str, json: bool) -> Result<()> {
    use ledgerlake_lakehouse::snapshot;
    let lake = Lake::new(config.lake()?);
    let s = snapshot::snapshot(&lake, &at.parse()?).await?;
    let d = &s.datanet;
    let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
    if json {
        let out = serde_json::json!({
            "datanet_id": d.id.to_string(),
            "name": d.name,
            "owner": d.owner.to_string(),
            "license": d.license,
            "status": lower(&d.status),
            "visibility": lower(&d.visibility),
            "snapshot": s.reference().to_string(),
            "version": s.version,
            "contributions": s.contributions.len(),
            "contributors": s.contributors(),
            "bytes": s.content_bytes(),
            "excluded": s.excluded,
            "contribution_ids": s.contributions.iter().map(|c| c.contribution_id.to_string()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("datanet      {} ({})", d.id, d.name);
    println!("owner        {}", d.owner);
    println!("license      {}", d.license);
    println!("status       {}, {}", lower(&d.status), lower(&d.visibility));
    println!("snapshot     {} (version {} of contribution_reviewed)", s.reference(), s.version);
    println!("contributions {} from {} contributors, {} bytes of text", s.contributions.len(), s.contributors(), s.content_bytes());
    println!("excluded     {} (latest review rejected or flagged)", s.excluded);
    Ok(())
}

/// Writes `bytes` to a new file only its owner may read (never over an existing one).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn sign(key: &Keypair, deployment: &ledgerlake_lakehouse::Deployment, what: SignCommand) -> Result<()> {
    use ledgerlake_lakehouse::events::{ContributionReviewed, ContributionSubmitted};
    let envelope = |e: EnvelopeArgs| -> Result<(ledgerlake_lakehouse::EventId, chrono::DateTime<chrono::Utc>)> {
        let id = match e.event_id {
            Some(id) => id,
            None => format!("evt-{}", hex::encode(rand::random::<[u8; 16]>())),
        };
        Ok((id.parse()?, e.event_time.unwrap_or_else(chrono::Utc::now)))
    };
    let mut event: Event = match what {
        SignCommand::Contribution { datanet, content_file, content, license, envelope: e } => {
            let content = match (content_file, content) {
                (Some(f), _) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
                (None, Some(c)) => c,
                (None, None) => bail!("give --content or --content-file"),
            };
            let (event_id, event_time) = envelope(e)?;
            ContributionSubmitted {
                event_id,
                event_time,
                contribution_id: None,
                datanet_id: datanet.parse()?,
                contributor: key.address(),
                content,
                content_sha256: None,
                license,
                language: None,
                source: None,
                tags: vec![],
                signature: ledgerlake_lakehouse::Signature::placeholder(),
            }
            .into()
        }
        SignCommand::Review { contribution, datanet, verdict, reason, envelope: e } => {
            let verdict: Verdict = serde_json::from_value(serde_json::Value::String(verdict))
                .context("verdict is approved, rejected or flagged")?;
            let (event_id, event_time) = envelope(e)?;
            ContributionReviewed {
                event_id,
                event_time,
                contribution_id: contribution.parse::<ContributionId>()?,
                datanet_id: datanet.parse()?,
                reviewer: key.address(),
                verdict,
                reason,
                signature: ledgerlake_lakehouse::Signature::placeholder(),
            }
            .into()
        }
        SignCommand::Event { json } => {
            let text = if json == "-" { std::io::read_to_string(std::io::stdin())? } else { json };
            let mut value: serde_json::Value = serde_json::from_str(&text).context("the event is a JSON object")?;
            let obj = value.as_object_mut().context("the event is a JSON object")?;
            let kind: EventKind = obj.remove("kind").and_then(|k| k.as_str().map(str::to_owned)).context("the event names its `kind`")?.parse()?;
            if !obj.contains_key("event_id") {
                obj.insert("event_id".into(), format!("evt-{}", hex::encode(rand::random::<[u8; 16]>())).into());
            }
            if !obj.contains_key("event_time") {
                obj.insert("event_time".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
            }
            if !obj.contains_key("signature") {
                obj.insert("signature".into(), ledgerlake_lakehouse::Signature::placeholder().to_string().into());
            }
            Event::from_json_fields(kind, value).map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?
        }
    };
    key.sign_event(&mut event, deployment).map_err(anyhow::Error::msg)?;
    let mut out = serde_json::json!({"event": event_to_json(&event)});
    if let Some((signer, Some(signature))) = ledgerlake_lakehouse::messages::signer(&event) {
        out["signer"] = signer.to_string().into();
        out["signature"] = signature.to_string().into();
    }
    if let Event::ContributionSubmitted(c) = &event {
        out["contributor"] = c.contributor.to_string().into();
        out["contribution_id"] = c.contribution_id.as_ref().map(|i| i.to_string()).into();
        out["content_sha256"] = c.content_sha256.as_ref().map(|i| i.to_string()).into();
    }
    if let Event::ContributionReviewed(r) = &event {
        out["reviewer"] = r.reviewer.to_string().into();
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn table_kinds(table: Option<&str>) -> Result<Vec<EventKind>> {
    match table {
        None => Ok(EventKind::ALL.to_vec()),
        Some(t) => EventKind::ALL
            .iter()
            .find(|k| k.table() == t || k.name() == t)
            .map(|k| vec![*k])
            .ok_or_else(|| anyhow::anyhow!("no table {t:?}; see `ledgerlake tables`")),
    }
}

fn spool(command: SpoolCommand) -> Result<()> {
    let open = |config: &ConfigArgs| -> Result<ledgerlake_accounting::Spool> {
        Ok(ledgerlake_accounting::Spool::open(&Config::load(config)?.state_dir()?.join("spool"))?)
    };
    match command {
        SpoolCommand::List { config } => {
            let spool = open(&config)?;
            let quarantined = spool.quarantined()?;
            println!("{}: {} waiting, {} quarantined", spool.dir().display(), spool.pending_count()?, quarantined.len());
            for q in quarantined {
                println!("{}\t{}", q.name, q.reason);
            }
        }
        SpoolCommand::Redrive { names, all, config } => {
            let spool = open(&config)?;
            let names = if all { spool.quarantined()?.into_iter().map(|q| q.name).collect() } else { names };
            if names.is_empty() {
                bail!("name the quarantined files to re-drive, or pass --all");
            }
            let mut failed = 0;
            for name in names {
                match spool.redrive(&name) {
                    Ok(()) => println!("{name}\tback in the spool"),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{name}\t{e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} file(s) stay in the quarantine");
            }
        }
    }
    Ok(())
}

/// The first day `inference_tokens` keeps when it keeps `days` days (today included).
fn expiry_date(days: u32) -> chrono::NaiveDate {
    let today = chrono::Utc::now().date_naive();
    today.checked_sub_days(chrono::Days::new(u64::from(days).saturating_sub(1))).unwrap_or(chrono::NaiveDate::MIN)
}

/// `up`'s retention of `inference_tokens`: once at start, then every hour.
async fn expire_tokens_hourly(lake: Lake, days: u32) {
    loop {
        match lake.expire(EventKind::InferenceTokens, expiry_date(days)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, days, "expired inference token rows"),
            Err(e) => tracing::warn!(error = %e, "expiring inference token rows"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

async fn maintenance(command: MaintenanceCommand) -> Result<()> {
    match command {
        MaintenanceCommand::Compact { table, config } => {
            let lake = Lake::new(Config::load(&config)?.lake()?);
            for kind in table_kinds(table.as_deref())? {
                let (removed, added) = lake.compact(kind).await?;
                println!("{:<24} compacted {removed} files into {added}", kind.table());
            }
        }
        MaintenanceCommand::Expire { days, before, config } => {
            let config = Config::load(&config)?;
            let lake = Lake::new(config.lake()?);
            let before = match (before, days.unwrap_or(config.token_retention_days)) {
                (Some(date), _) => date,
                (None, 0) => bail!("token_retention_days is 0: rows are kept forever (give --days or --before)"),
                (None, days) => expiry_date(days),
            };
            let removed = lake.expire(EventKind::InferenceTokens, before).await?;
            println!("{:<24} removed {removed} files of days before {before}", EventKind::InferenceTokens.table());
        }
        MaintenanceCommand::Vacuum { table, retention_hours, config } => {
            let lake = Lake::new(Config::load(&config)?.lake()?);
            for kind in table_kinds(table.as_deref())? {
                let deleted = lake.vacuum(kind, Duration::from_secs(retention_hours * 3600)).await?;
                println!("{:<24} vacuumed {deleted} files", kind.table());
            }
        }
    }
    Ok(())
}
