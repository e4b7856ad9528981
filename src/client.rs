//! The HTTP client side of the CLI: bulk ingest, the demo workload, API keys.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ledgerlake_ingest::demo::Workload;
use ledgerlake_ingest::validate::event_to_json;
use serde::Deserialize;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// URL of a running `ledgerlake up`.
    #[arg(long, env = "LEDGERLAKE_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// A file holding the API key (or set LEDGERLAKE_API_KEY to the key); default: the admin
    /// key of a local lake in ./data. Keys are never taken on the command line, where `ps`
    /// shows them.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
}

impl ServerArgs {
    pub(crate) fn key(&self) -> Result<String> {
        use crate::config::Secret;
        let local = Path::new("data/_ledgerlake/admin.key");
        let key = match Secret::from_file_or_env(self.api_key_file.as_deref(), "LEDGERLAKE_API_KEY", "--api-key-file") {
            Ok(key) => key,
            // Neither given: the admin key of a local lake, if there is one here.
            Err(_) if self.api_key_file.is_none() && local.exists() => Secret::from_file(local)?,
            Err(_) if self.api_key_file.is_none() => {
                bail!("no API key: give --api-key-file FILE or set LEDGERLAKE_API_KEY (or run where a local lake's {} is)", local.display())
            }
            Err(e) => return Err(e),
        };
        Ok(key.expose().to_owned())
    }
}

/// Which deployment participant signatures are for (the EIP-712 domain, docs/events.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeploymentArgs {
    /// The deployment id to sign for (0x + 64 hex digits, `GET /v1/deployment`); default:
    /// asked of the server.
    #[arg(long, env = "LEDGERLAKE_DEPLOYMENT")]
    pub deployment: Option<String>,
    /// The EVM chain id in the deployment's domain (with --deployment, when the server has
    /// a chain configured).
    #[arg(long, requires = "deployment")]
    pub chain_id: Option<u64>,
}

impl DeploymentArgs {
    /// The deployment given, or the one `server` answers with.
    pub async fn resolve(&self, server: &str) -> Result<ledgerlake_lakehouse::Deployment> {
        if let Some(id) = &self.deployment {
            let id = id.trim().to_ascii_lowercase().parse().context("--deployment is 0x and 64 hex digits")?;
            return Ok(ledgerlake_lakehouse::Deployment { id, chain_id: self.chain_id });
        }
        deployment_of(server).await
    }
}

/// `GET /v1/deployment` of a running server.
pub async fn deployment_of(server: &str) -> Result<ledgerlake_lakehouse::Deployment> {
    #[derive(Deserialize)]
    struct Info {
        deployment_id: String,
        chain_id: Option<u64>,
    }
    let url = format!("{}/v1/deployment", server.trim_end_matches('/'));
    let resp = reqwest::Client::new().get(&url).send().await.with_context(|| format!("GET {url} (or give --deployment)"))?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    let info: Info = resp.json().await.with_context(|| format!("reading {url}"))?;
    Ok(ledgerlake_lakehouse::Deployment { id: info.deployment_id.parse().context("the server's deployment id")?, chain_id: info.chain_id })
}

#[derive(Debug, Deserialize)]
pub struct EventsResponse {
    pub accepted: usize,
    pub duplicates: usize,
    #[serde(default)]
    pub errors: Vec<serde_json::Value>,
}

/// Posts one body to `/v1/events`, waiting and retrying while the server answers 503.
pub async fn post_events(
    http: &reqwest::Client,
    server: &str,
    key: &str,
    content_type: &str,
    query: &str,
    body: Vec<u8>,
) -> Result<EventsResponse> {
    let url = format!("{}/v1/events{query}", server.trim_end_matches('/'));
    for attempt in 0..60 {
        let resp = http
            .post(&url)
            .bearer_auth(key)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.clone())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if attempt < 59 && (e.is_connect() || e.is_timeout()) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("POST {url}")),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let wait = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        let text = resp.text().await?;
        if status.is_success() || status == reqwest::StatusCode::UNPROCESSABLE_ENTITY {
            return serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"));
        }
        bail!("{url} answered {status}: {text}");
    }
    bail!("{url} stayed unavailable")
}

fn bar(len: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template = format!("{{spinner}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    pb
}

#[derive(Default)]
pub struct Totals {
    pub accepted: usize,
    pub duplicates: usize,
    pub errors: usize,
}

impl Totals {
    fn add(&mut self, r: &EventsResponse) {
        self.accepted += r.accepted;
        self.duplicates += r.duplicates;
        self.errors += r.errors.len();
    }
}

pub async fn ingest_files(server: &ServerArgs, files: &[PathBuf], kind: Option<&str>, batch: usize) -> Result<()> {
    let key = server.key()?;
    let http = reqwest::Client::new();
    let mut totals = Totals::default();
    let mut first_errors = Vec::new();
    for file in files {
        let is_parquet = file.extension().is_some_and(|e| e == "parquet");
        if is_parquet {
            let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                .with_context(|| format!("{} is not a Parquet file", file.display()))?;
            let pb = bar(builder.metadata().file_metadata().num_rows() as u64, "events");
            let query = kind.map(|k| format!("?kind={k}")).unwrap_or_default();
            for batch in builder.with_batch_size(batch).build()? {
                let batch = batch?;
                let mut ipc = Vec::new();
                {
                    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema())?;
                    w.write(&batch)?;
                    w.finish()?;
                }
                let r = post_events(&http, &server.server, &key, "application/vnd.apache.arrow.stream", &query, ipc).await?;
                totals.add(&r);
                first_errors.extend(r.errors.into_iter().take(5));
                pb.inc(batch.num_rows() as u64);
            }
            pb.finish();
        } else {
            let len = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
            let pb = bar(len, "bytes");
            let reader = BufReader::new(std::fs::File::open(file)?);
            let mut body = Vec::new();
            let mut lines = 0;
            for line in reader.lines() {
                let line = line.with_context(|| format!("reading {}", file.display()))?;
                body.extend_from_slice(line.as_bytes());
                body.push(b'\n');
                lines += 1;
                if lines == batch {
                    let sent = std::mem::take(&mut body);
                    pb.inc(sent.len() as u64);
                    let r = post_events(&http, &server.server, &key, "application/x-ndjson", "", sent).await?;
                    totals.add(&r);
                    first_errors.extend(r.errors.into_iter().take(5));
                    lines = 0;
                }
            }
            if !body.is_empty() {
                pb.inc(body.len() as u64);
                let r = post_events(&http, &server.server, &key, "application/x-ndjson", "", body).await?;
                totals.add(&r);
                first_errors.extend(r.errors.into_iter().take(5));
            }
            pb.finish();
        }
    }
    println!("accepted {}, duplicates {}, rejected {}", totals.accepted, totals.duplicates, totals.errors);
    for e in first_errors.iter().take(10) {
        println!("  rejected: {e}");
    }
    if totals.errors > 0 {
        bail!("{} events were rejected", totals.errors);
    }
    Ok(())
}

/// NDJSON request bodies of `batch` events each.
pub fn ndjson_bodies(events: &[ledgerlake_lakehouse::Event], batch: usize) -> Result<Vec<Vec<u8>>> {
    events
        .chunks(batch)
        .map(|chunk| {
            let mut body = Vec::new();
            for e in chunk {
                serde_json::to_writer(&mut body, &event_to_json(e))?;
                body.push(b'\n');
            }
            Ok(body)
        })
        .collect()
}

pub async fn demo(server: &ServerArgs, events: usize, seed: u64) -> Result<()> {
    let key = server.key()?;
    let http = reqwest::Client::new();
    let deployment = deployment_of(&server.server).await?;
    let all = Workload::for_deployment(seed, deployment, chrono::Utc::now()).events(events);
    let pb = bar(all.len() as u64, "events");
    let mut totals = Totals::default();
    for body in ndjson_bodies(&all, 2_000)? {
        let r = post_events(&http, &server.server, &key, "application/x-ndjson", "", body).await?;
        if let Some(e) = r.errors.first() {
            bail!("the server rejected a demo event: {e}");
        }
        totals.add(&r);
        pb.inc((r.accepted + r.duplicates) as u64);
    }
    pb.finish();
    println!("demo workload sent: accepted {}, duplicates {}", totals.accepted, totals.duplicates);
    Ok(())
}

/// `ledgerlake void`: records an `event.voided` by the admin key.
pub async fn void(server: &ServerArgs, event_id: &str, kind: &str, reason: &str) -> Result<()> {
    let key = server.key()?;
    let event = serde_json::json!({
        "kind": "event.voided",
        "event_id": format!("void-{}", hex::encode(rand::random::<[u8; 12]>())),
        "event_time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "voided_event_id": event_id,
        "voided_kind": kind,
        "reason": reason,
        "voided_by": ledgerlake_ingest::auth::id_of(&key),
    });
    let r = post_events(&reqwest::Client::new(), &server.server, &key, "application/json", "", serde_json::to_vec(&event)?).await?;
    if let Some(e) = r.errors.first() {
        bail!("the server refused the void: {e}");
    }
    println!("voided {event_id} ({kind}): {reason}");
    Ok(())
}

pub async fn create_api_key(server: &ServerArgs, role: &str, address: Option<&str>) -> Result<()> {
    let key = server.key()?;
    let url = format!("{}/v1/keys", server.server.trim_end_matches('/'));
    let resp = reqwest::Client::new().post(&url).bearer_auth(key).json(&serde_json::json!({"role": role, "address": address})).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {text}");
    }
    println!("{text}");
    Ok(())
}

/// `ledgerlake sql --server`: runs a query on a running server and writes the answer to
/// standard output as it arrives (`table` asks for Arrow and prints it as a text table).
pub async fn sql(server: &ServerArgs, query: &str, format: ledgerlake_sql::Format) -> Result<()> {
    use ledgerlake_sql::Format;
    let wire = if format == Format::Table { Format::Arrow } else { format };
    let url = format!("{}/v1/sql", server.server.trim_end_matches('/'));
    let mut resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(server.key()?)
        .header(reqwest::header::ACCEPT, wire.media_type())
        .json(&serde_json::json!({ "sql": query }))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("(no message)");
        bail!("{status}: {message}");
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if format == Format::Table {
        let bytes = resp.bytes().await?;
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(&batches)?)?;
    } else {
        while let Some(chunk) = resp.chunk().await? {
            out.write_all(&chunk)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Sends events built here in NDJSON bodies of 64, failing on the first one the server
/// refuses (`what` names them in the error).
pub async fn send_events(server: &ServerArgs, events: &[ledgerlake_lakehouse::Event], what: &str) -> Result<Totals> {
    let key = server.key()?;
    let http = reqwest::Client::new();
    let mut totals = Totals::default();
    for body in ndjson_bodies(events, 64)? {
        let r = post_events(&http, &server.server, &key, "application/x-ndjson", "", body).await?;
        if let Some(e) = r.errors.first() {
            bail!("the server refused a {what}: {e}");
        }
        totals.add(&r);
    }
    Ok(totals)
}

/// Sends events in one atomic request (`?atomic=true`): all are stored or none.
pub async fn send_atomic(server: &ServerArgs, events: &[ledgerlake_lakehouse::Event], what: &str) -> Result<()> {
    let key = server.key()?;
    let http = reqwest::Client::new();
    let body = ndjson_bodies(events, events.len().max(1))?.concat();
    let r = post_events(&http, &server.server, &key, "application/x-ndjson", "?atomic=true", body).await?;
    if let Some(e) = r.errors.first() {
        bail!("the server refused a {what}: {e}");
    }
    Ok(())
}

/// `ledgerlake contribute`: every file's text, chunked on paragraph boundaries, each chunk
/// signed by `key` and sent as a `contribution.submitted`. All files are read and chunked
/// before anything is sent, so a bad file sends nothing; sending again is a no-op (the
/// event ids repeat and come back as duplicates).
pub async fn contribute(server: &ServerArgs, signer: &ledgerlake_ingest::sign::Keypair, datanet: &str, files: &[PathBuf], chunk_bytes: usize, license: &str) -> Result<()> {
    use ledgerlake_ingest::documents;
    if chunk_bytes == 0 || chunk_bytes > documents::MAX_CONTENT_BYTES {
        bail!("--chunk-bytes must be between 1 and {}", documents::MAX_CONTENT_BYTES);
    }
    let datanet: ledgerlake_lakehouse::DatanetId = datanet.parse()?;
    let deployment = deployment_of(&server.server).await?;
    let now = chrono::Utc::now();
    let mut events = Vec::new();
    for file in files {
        let text = documents::extract_text(file)?;
        let chunks = documents::chunk(&text, chunk_bytes);
        if chunks.is_empty() {
            bail!("{}: no text to contribute", file.display());
        }
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| file.display().to_string());
        let signed = documents::contributions(&signer, &deployment, &datanet, &name, &chunks, license, now)?;
        println!("{}: {} chunks", file.display(), signed.len());
        events.extend(signed.into_iter().map(|c| ledgerlake_lakehouse::Event::from(c.event)));
    }
    let totals = send_events(server, &events, "contribution").await?;
    println!(
        "contributed {} chunks to {datanet} as {}: {} new, {} already there",
        events.len(),
        signer.address(),
        totals.accepted,
        totals.duplicates
    );
    Ok(())
}
