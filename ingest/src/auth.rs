//! API keys with roles, sent as `Authorization: Bearer <key>`.
//!
//! Only the sha256 of a key is stored (`api-keys.json` in the state directory, mode 0600);
//! the key itself is shown once, when it is made. The admin key comes from the operator
//! (`--admin-key` / `LEDGERLAKE_ADMIN_KEY`) or is generated on first start and written to
//! `admin.key` (0600) beside it.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use ledgerlake_lakehouse::Address;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// What a key may do. `admin` includes every role; `ingest`, `builder` and `service` each
/// include `read`. A `builder` key is bound to an address when it is made: it trains
/// adapters (`/v1/training/jobs`) as that address. A `service` key writes service facts
/// (inferences, fees, attributions: `docs/security.md`) for an external serving fleet the
/// operator trusts. No role signs for a participant: what any key may send is decided by
/// the authority of each event kind (`crate::authority`), and participant events carry
/// their own signatures, so `read` and `ingest` keys send exactly the same events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Ingest,
    Builder,
    Service,
    Admin,
}

impl Role {
    /// Whether a key of this role may do what `need` may.
    pub fn includes(self, need: Role) -> bool {
        self == need || self == Role::Admin || need == Role::Read
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Ingest => "ingest",
            Role::Builder => "builder",
            Role::Service => "service",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "ingest" => Ok(Role::Ingest),
            "builder" => Ok(Role::Builder),
            "service" => Ok(Role::Service),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: admin, builder, service, ingest or read")),
        }
    }
}

/// Who a request is, once its key is known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// A short public id of the key (safe to log and to record as `caller`).
    pub id: String,
    pub role: Role,
    /// The address a `builder` key acts as, or a `read`/`ingest` key reads as (none for
    /// `service` and `admin` keys).
    pub address: Option<Address>,
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: String,
    role: Role,
    sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<Address>,
}

struct Table {
    by_hash: HashMap<[u8; 32], Principal>,
    file_mtime: Option<SystemTime>,
}

pub struct ApiKeys {
    file: PathBuf,
    admin: Option<([u8; 32], Principal)>,
    table: RwLock<Table>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn key_id(hash: &[u8; 32]) -> String {
    format!("key_{}", hex::encode(&hash[..6]))
}

/// The public id of `key` (what the server records as `caller`, `voided_by`, ...).
pub fn id_of(key: &str) -> String {
    key_id(&digest(key.trim()))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename).
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A new random key for `role`.
pub fn generate_key(role: Role) -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("llk_{role}_{}", hex::encode(bytes))
}

impl ApiKeys {
    /// Opens the key store in `state_dir`. Returns the store and, when an admin key had to
    /// be generated just now, that key (to be shown once).
    pub fn open(state_dir: &Path, admin_key: Option<&str>) -> Result<(Self, Option<String>), Error> {
        std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let admin_file = state_dir.join("admin.key");
        let mut generated = None;
        let admin_key = match admin_key {
            Some(k) if k.trim().len() < 16 => {
                return Err(Error::BadRequest("the admin key must be at least 16 characters".into()));
            }
            Some(k) => k.trim().to_owned(),
            None => match std::fs::read_to_string(&admin_file) {
                Ok(k) => k.trim().to_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let k = generate_key(Role::Admin);
                    write_private(&admin_file, format!("{k}\n").as_bytes())?;
                    generated = Some(k.clone());
                    k
                }
                Err(e) => return Err(io(&admin_file)(e)),
            },
        };
        let hash = digest(&admin_key);
        let keys = Self {
            file: state_dir.join("api-keys.json"),
            admin: Some((hash, Principal { id: key_id(&hash), role: Role::Admin, address: None })),
            table: RwLock::new(Table { by_hash: HashMap::new(), file_mtime: None }),
        };
        keys.reload()?;
        Ok((keys, generated))
    }

    fn mtime(&self) -> Option<SystemTime> {
        std::fs::metadata(&self.file).and_then(|m| m.modified()).ok()
    }

    fn reload(&self) -> Result<(), Error> {
        let mtime = self.mtime();
        let stored: Vec<StoredKey> = match std::fs::read(&self.file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::BadRequest(format!("{} is not a key list: {e}", self.file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&self.file)(e)),
        };
        let mut by_hash = HashMap::new();
        for k in stored {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&k.sha256, &mut hash).is_ok() {
                by_hash.insert(hash, Principal { id: k.id, role: k.role, address: k.address });
            }
        }
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        *table = Table { by_hash, file_mtime: mtime };
        Ok(())
    }

    /// Who holds `key`, if anyone. Keys added to the file by another process are picked up.
    pub fn authenticate(&self, key: &str) -> Option<Principal> {
        let hash = digest(key);
        if let Some((admin, p)) = &self.admin
            && *admin == hash
        {
            return Some(p.clone());
        }
        let stale = {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = table.by_hash.get(&hash) {
                return Some(p.clone());
            }
            table.file_mtime != self.mtime()
        };
        if stale && self.reload().is_ok() {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            return table.by_hash.get(&hash).cloned();
        }
        None
    }

    /// Makes a new key with `role`; returns who it is and the key (shown only now). A
    /// `builder` key needs the address it acts as; a `read` or `ingest` key may be bound to
    /// one (it then reads that address's private datanets: owned or granted); `service` and
    /// `admin` keys take none.
    pub fn create(&self, role: Role, address: Option<Address>) -> Result<(Principal, String), Error> {
        match (role, address) {
            (Role::Builder, None) => return Err(Error::BadRequest("a builder key is bound to an address: give `address`".into())),
            (Role::Service | Role::Admin, Some(_)) => {
                return Err(Error::BadRequest(format!("{role} keys act for no participant: they are bound to no address")));
            }
            _ => {}
        }
        let key = generate_key(role);
        let hash = digest(&key);
        let principal = Principal { id: key_id(&hash), role, address };
        let _ = self.reload();
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        table.by_hash.insert(hash, principal.clone());
        let stored: Vec<StoredKey> = table
            .by_hash
            .iter()
            .map(|(h, p)| StoredKey { id: p.id.clone(), role: p.role, sha256: hex::encode(h), address: p.address })
            .collect();
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| Error::BadRequest(e.to_string()))?;
        write_private(&self.file, &json)?;
        table.file_mtime = self.mtime();
        Ok((principal, key))
    }

    /// Checks `Authorization: Bearer <key>` against the role a route needs.
    pub fn authorize(&self, authorization: Option<&str>, need: Role) -> Result<Principal, Error> {
        let key = authorization.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
        self.authorize_key(key, need)
    }

    /// Checks a bare key (no `Bearer `) against the role a call needs.
    pub fn authorize_key(&self, key: Option<&str>, need: Role) -> Result<Principal, Error> {
        let key = key.map(str::trim).filter(|k| !k.is_empty()).ok_or(Error::Unauthorized)?;
        let principal = self.authenticate(key).ok_or(Error::Unauthorized)?;
        if !principal.role.includes(need) {
            return Err(Error::Forbidden { have: principal.role, need });
        }
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_persistence() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, generated) = ApiKeys::open(dir.path(), None).unwrap();
        let admin = generated.expect("a first start generates the admin key");
        let mode = std::fs::metadata(dir.path().join("admin.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert_eq!(keys.authorize(Some(&format!("Bearer {admin}")), Role::Admin).unwrap().role, Role::Admin);
        let (_, reader) = keys.create(Role::Read, None).unwrap();
        let bearer = format!("Bearer {reader}");
        assert!(keys.authorize(Some(&bearer), Role::Read).is_ok());
        assert!(matches!(keys.authorize(Some(&bearer), Role::Ingest), Err(Error::Forbidden { .. })));
        assert!(matches!(keys.authorize(None, Role::Read), Err(Error::Unauthorized)));
        assert!(matches!(keys.authorize(Some("Bearer nope"), Role::Read), Err(Error::Unauthorized)));

        // A second start finds the same admin key and the created key, and prints nothing.
        let (again, generated) = ApiKeys::open(dir.path(), None).unwrap();
        assert!(generated.is_none());
        assert!(again.authorize(Some(&bearer), Role::Read).is_ok());
        assert!(again.authorize(Some(&format!("Bearer {admin}")), Role::Admin).is_ok());
    }

    #[test]
    fn builder_keys_act_as_their_address_and_only_read_besides() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = ApiKeys::open(dir.path(), Some("an admin key of sixteen")).unwrap();
        let address: Address = "0x00000000000000000000000000000000000000aa".parse().unwrap();
        assert!(matches!(keys.create(Role::Builder, None), Err(Error::BadRequest(_))));
        assert!(matches!(keys.create(Role::Service, Some(address)), Err(Error::BadRequest(_))));
        assert!(matches!(keys.create(Role::Admin, Some(address)), Err(Error::BadRequest(_))));
        assert_eq!(keys.create(Role::Read, Some(address)).unwrap().0.address, Some(address), "a reader may be bound to its address");
        let (made, key) = keys.create(Role::Builder, Some(address)).unwrap();
        assert_eq!(made.address, Some(address));
        let (again, _) = ApiKeys::open(dir.path(), Some("an admin key of sixteen")).unwrap();
        let p = again.authorize_key(Some(&key), Role::Builder).unwrap();
        assert_eq!((p.role, p.address), (Role::Builder, Some(address)), "the binding survives a restart");
        assert!(again.authorize_key(Some(&key), Role::Read).is_ok());
        assert!(matches!(again.authorize_key(Some(&key), Role::Ingest), Err(Error::Forbidden { .. })));
        let (_, ingest) = again.create(Role::Ingest, None).unwrap();
        assert!(matches!(again.authorize_key(Some(&ingest), Role::Builder), Err(Error::Forbidden { .. })), "ingest does not include builder");
        assert!(again.authorize_key(Some("an admin key of sixteen"), Role::Builder).is_ok());
    }
}
