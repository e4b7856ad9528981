//! The durable local spool of completions' events.
//!
//! Each completion is one file, `<dir>/<inference_id>.json`: a JSON array of its events in
//! their `POST /v1/events` form. A file is written to a hidden temporary name, fsynced,
//! renamed into place and the directory fsynced, so a file the forwarder sees is whole.
//!
//! A streamed answer's **hold** is written the same way to `<dir>/holds/<inference_id>.json`
//! before its first token goes out: the events of its worst case (the prompt and
//! `max_tokens` completion tokens at its price). Its real events replace it when it ends
//! (the hold is then removed). A hold still there when `up` starts again belongs to an
//! answer cut off by a crash, and is moved into the spool as that answer's bill
//! ([`Spool::recover_holds`]): its event ids are the answer's, so if the real events were
//! stored first it is a duplicate, never a second charge.
//!
//! A file that cannot be read back (truncated, edited, an event the contract refuses) or
//! whose events the lake refuses is moved to `<dir>/quarantine/` with a `<name>.reason`
//! beside it, counted in the metrics and logged; it is never deleted. An operator reads the
//! quarantine (`ledgerlake spool list`), fixes a file if it can be fixed, and re-drives it
//! (`ledgerlake spool redrive`), which moves it back once it reads.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ledgerlake_ingest::validate::{BodyFormat, check, event_to_json, parse_body};
use ledgerlake_lakehouse::Event;

use crate::charge::Metered;
use crate::{Error, Result, io};

/// A spool directory and its quarantine.
#[derive(Clone, Debug)]
pub struct Spool {
    dir: PathBuf,
    quarantine: PathBuf,
    holds: PathBuf,
}

/// A quarantined file and why it is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub name: String,
    pub reason: String,
}

const REASON: &str = "reason";

impl Spool {
    /// Opens (creating) the spool at `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let quarantine = dir.join("quarantine");
        std::fs::create_dir_all(&quarantine).map_err(io(&quarantine))?;
        let holds = dir.join("holds");
        std::fs::create_dir_all(&holds).map_err(io(&holds))?;
        Ok(Self { dir: dir.to_owned(), quarantine, holds })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes a completion's events durable. Returns only once the file and its directory
    /// entry are on disk; on any error nothing of it is in the spool.
    pub fn write(&self, metered: &Metered) -> Result<()> {
        Self::write_into(&self.dir, metered)
    }

    /// Makes a streamed answer's hold durable (its worst case, `metered`), before any of
    /// its output is sent. Returns only once it is on disk.
    pub fn hold(&self, metered: &Metered) -> Result<()> {
        Self::write_into(&self.holds, metered)
    }

    /// Removes an answer's hold once its real events are in the spool. A hold that stays
    /// (a crash in between) bills nothing twice: its events are duplicates of the real ones.
    pub fn release(&self, inference_id: &str) -> Result<()> {
        let path = self.holds.join(format!("{inference_id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Holds left by a process that died while streaming: each becomes its answer's bill
    /// (moved into the spool), unless the answer's real events are there. Only `up` calls
    /// it, at start, before it serves: the holds of a running server are not left-overs.
    /// Returns how many were billed.
    pub fn recover_holds(&self) -> Result<usize> {
        let mut billed = 0;
        for hold in json_files(&self.holds)? {
            let Some(name) = hold.file_name() else { continue };
            let spooled = self.dir.join(name);
            if spooled.exists() {
                std::fs::remove_file(&hold).map_err(io(&hold))?;
            } else {
                std::fs::rename(&hold, &spooled).map_err(io(&hold))?;
                billed += 1;
            }
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        std::fs::File::open(&self.holds).and_then(|d| d.sync_all()).map_err(io(&self.holds))?;
        Ok(billed)
    }

    /// Holds of answers still streaming (or left by a crash, before `up` recovers them).
    pub fn held(&self) -> Result<usize> {
        Ok(json_files(&self.holds)?.len())
    }

    fn write_into(dir: &Path, metered: &Metered) -> Result<()> {
        let events = metered.events()?;
        let mut json = Vec::with_capacity(events.len());
        for (i, event) in events.into_iter().enumerate() {
            let event = check(i, event).map_err(|e| Error::InvalidEvent { field: e.field, message: e.message })?;
            json.push(event_to_json(&event));
        }
        // Serialising a Vec of JSON values cannot fail.
        let body = serde_json::to_vec(&json).unwrap_or_default();
        let name = format!("{}.json", metered.inference_id);
        let tmp = dir.join(format!(".{name}.tmp"));
        let written = (|| {
            // 0600: a spool file holds a caller's prompt and output token ids.
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(&name))?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(dir)(e));
        }
        Ok(())
    }

    /// Files waiting to be forwarded, oldest name first, at most `limit`.
    pub fn pending(&self, limit: usize) -> Result<Vec<PathBuf>> {
        let mut files = json_files(&self.dir)?;
        files.sort();
        files.truncate(limit);
        Ok(files)
    }

    /// How many files wait to be forwarded.
    pub fn pending_count(&self) -> Result<usize> {
        Ok(json_files(&self.dir)?.len())
    }

    /// The events of a spool file, or why it cannot be used.
    pub fn read(path: &Path) -> std::result::Result<Vec<Event>, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read the file: {e}"))?;
        let items = parse_body(BodyFormat::JsonArray, &bytes, None).map_err(|e| e.to_string())?;
        if items.is_empty() {
            return Err("the file holds no events".into());
        }
        let mut events = Vec::with_capacity(items.len());
        let mut errors = Vec::new();
        for (_, item) in items {
            match item {
                Ok(e) => events.push(e),
                Err(e) => errors.push(format!("event {} ({}): {}", e.index, e.field, e.message)),
            }
        }
        if errors.is_empty() { Ok(events) } else { Err(errors.join("; ")) }
    }

    /// Moves a spool file to the quarantine with its reason.
    pub fn quarantine(&self, path: &Path, reason: &str) -> Result<()> {
        let name = path.file_name().ok_or_else(|| Error::NotQuarantined(path.display().to_string()))?;
        let dest = self.quarantine.join(name);
        let reason_path = self.quarantine.join(format!("{}.{REASON}", name.to_string_lossy()));
        std::fs::write(&reason_path, format!("{reason}\n")).map_err(io(&reason_path))?;
        std::fs::rename(path, &dest).map_err(io(path))?;
        std::fs::File::open(&self.quarantine).and_then(|d| d.sync_all()).map_err(io(&self.quarantine))?;
        tracing::error!(file = %dest.display(), %reason, "a spool file was quarantined; `ledgerlake spool list` shows it");
        Ok(())
    }

    /// Every quarantined file with its reason, by name.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>> {
        let mut out: Vec<Quarantined> = json_files(&self.quarantine)?
            .into_iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                let reason = std::fs::read_to_string(self.quarantine.join(format!("{name}.{REASON}"))).unwrap_or_default();
                Some(Quarantined { name, reason: reason.trim().to_owned() })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Moves a quarantined file back into the spool, if it now reads; the forwarder takes
    /// it from there (its event ids make a re-drive of already stored events a duplicate).
    pub fn redrive(&self, name: &str) -> Result<()> {
        let is_plain_name = Path::new(name).file_name().is_some_and(|f| f == name);
        let path = self.quarantine.join(name);
        if !is_plain_name || !name.ends_with(".json") || !path.is_file() {
            return Err(Error::NotQuarantined(name.to_owned()));
        }
        Self::read(&path).map_err(|reason| Error::Unreadable { file: name.to_owned(), reason })?;
        std::fs::rename(&path, self.dir.join(name)).map_err(io(&path))?;
        let _ = std::fs::remove_file(self.quarantine.join(format!("{name}.{REASON}")));
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

/// The `*.json` files directly in `dir` (temporary files start with a dot).
fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        let visible = path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.'));
        if visible && path.extension().is_some_and(|x| x == "json") && path.is_file() {
            out.push(path);
        }
    }
    Ok(out)
}
