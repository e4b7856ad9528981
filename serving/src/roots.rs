//! Where adapters may be read from: the configured adapter roots (local directories and
//! object-store prefixes) and a size cap. A registration's `adapter_uri` or a load's
//! `lora_path` outside every root is refused, so no builder can make the server read its
//! private files or another bucket its credentials reach (`docs/security.md`).

use std::path::{Component, Path, PathBuf};

/// Where an allowed adapter is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local directory, canonical (symbolic links and `..` resolved).
    Local(PathBuf),
    /// An object-store directory URI (`s3://bucket/prefix`), as given.
    Remote(String),
}

/// The adapter roots of a deployment and the most bytes one adapter may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterRoots {
    local: Vec<PathBuf>,
    /// `scheme://bucket/prefix/`, always ending in `/`.
    remote: Vec<String>,
    pub max_bytes: u64,
}

impl AdapterRoots {
    /// Roots from their written forms: local directories (a path or `file://`) and
    /// object-store prefixes (`s3://bucket/prefix`). A local root that does not exist yet
    /// is kept as written (made absolute).
    pub fn new(roots: &[String], max_bytes: u64) -> Result<Self, String> {
        let mut local = Vec::new();
        let mut remote = Vec::new();
        for root in roots.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            match root.split_once("://") {
                Some(("file", path)) => local.push(canonical_or_absolute(Path::new(path))?),
                Some((scheme, rest)) => {
                    if rest.is_empty() || rest.split('/').any(|s| s == "..") {
                        return Err(format!("adapter root {root:?} names no bucket or has `..`"));
                    }
                    let mut r = format!("{scheme}://{rest}");
                    if !r.ends_with('/') {
                        r.push('/');
                    }
                    remote.push(r);
                }
                None => local.push(canonical_or_absolute(Path::new(root))?),
            }
        }
        Ok(Self { local, remote, max_bytes })
    }

    /// Where `uri` (a path, `file://` path or object-store URI) is, if it is under a root.
    pub fn check(&self, uri: &str) -> Result<Location, String> {
        let outside = || format!("{uri} is outside the adapter roots this server reads from (config `adapter_roots`)");
        match uri.split_once("://") {
            Some(("file", path)) => self.local(Path::new(path)).ok_or_else(outside),
            Some((_, rest)) => {
                if rest.split('/').any(|s| s == ".." || s == ".") {
                    return Err(outside());
                }
                let dir = if uri.ends_with('/') { uri.to_owned() } else { format!("{uri}/") };
                match self.remote.iter().any(|r| dir.starts_with(r.as_str())) {
                    true => Ok(Location::Remote(uri.to_owned())),
                    false => Err(outside()),
                }
            }
            None => self.local(Path::new(uri)).ok_or_else(outside),
        }
    }

    fn local(&self, path: &Path) -> Option<Location> {
        // Canonical: a link or `..` cannot lead out of a root.
        let Ok(real) = std::fs::canonicalize(path) else {
            // Nothing there to read: allowed only where it would be inside a root written
            // plainly (reading it then fails as a missing adapter does).
            let plain = canonical_or_absolute(path).ok()?;
            return self.local.iter().any(|root| plain.starts_with(root)).then_some(Location::Local(plain));
        };
        self.local.iter().any(|root| real.starts_with(root)).then_some(Location::Local(real))
    }

    /// Checks a local adapter directory's files against the size cap (before they are read).
    pub fn check_size(&self, dir: &Path) -> Result<(), String> {
        let mut total: u64 = 0;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // Reading the adapter says what is missing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
        };
        let home = std::fs::canonicalize(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            // Followed as the loader would follow it: a link out of the adapter's directory
            // is refused, and what it points at counts.
            let real = std::fs::canonicalize(entry.path()).map_err(|e| format!("cannot read {}: {e}", entry.path().display()))?;
            if !real.starts_with(&home) {
                return Err(format!("{} leads out of the adapter's directory", entry.file_name().to_string_lossy()));
            }
            let meta = std::fs::metadata(&real).map_err(|e| format!("cannot read {}: {e}", real.display()))?;
            if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
        if total > self.max_bytes {
            return Err(format!("the adapter holds {total} bytes; an adapter may hold at most {} (config `adapter_max_bytes`)", self.max_bytes));
        }
        Ok(())
    }
}

fn canonical_or_absolute(path: &Path) -> Result<PathBuf, String> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Ok(p);
    }
    let abs = if path.is_absolute() { path.to_owned() } else { std::env::current_dir().map_err(|e| e.to_string())?.join(path) };
    if abs.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("adapter root {} has `..`", path.display()));
    }
    Ok(abs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_under_a_root_is_read_links_and_dotdot_included() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("adapters");
        let inside = root.join("a");
        let outside = dir.path().join("private");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("adapter_model.safetensors"), vec![0u8; 100]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let roots = AdapterRoots::new(&[root.display().to_string(), "s3://lake/adapters".into()], 64).unwrap();
        assert!(matches!(roots.check(inside.to_str().unwrap()), Ok(Location::Local(_))));
        assert!(roots.check(&format!("file://{}", inside.display())).is_ok());
        for bad in [
            outside.display().to_string(),
            format!("{}/../private", root.display()),
            root.join("link").display().to_string(),
            "/etc".into(),
            "s3://lake/other".into(),
            "s3://lake/adapters/../secrets".into(),
            "s3://lake/adaptersX/a".into(),
            "s3://other/adapters/a".into(),
        ] {
            assert!(roots.check(&bad).is_err(), "{bad} was allowed");
        }
        assert_eq!(roots.check("s3://lake/adapters/legal").unwrap(), Location::Remote("s3://lake/adapters/legal".into()));
        // Nothing there: inside a root it is a missing adapter (reading it says so), outside
        // it stays outside (no oracle of what exists elsewhere).
        assert_eq!(roots.check(root.join("missing").to_str().unwrap()).unwrap(), Location::Local(root.join("missing").canonicalize().unwrap_or(root.canonicalize().unwrap().join("missing"))));
        assert!(roots.check(dir.path().join("missing").to_str().unwrap()).is_err());
        assert!(roots.check(&format!("{}/missing/../../private", root.display())).is_err());
        assert!(roots.check_size(&inside).is_err(), "100 bytes over a cap of 64");
        // A file linked out of the adapter's directory is refused, whatever its size.
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let linked = root.join("linked");
        std::fs::create_dir_all(&linked).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), linked.join("adapter_model.safetensors")).unwrap();
        assert!(roots.check_size(&linked).unwrap_err().contains("leads out"));
        let roomy = AdapterRoots { max_bytes: 100, ..roots };
        roomy.check_size(&inside).unwrap();
    }
}
