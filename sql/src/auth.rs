//! Who may do what, asked of the caller: this crate knows no API keys. The binary answers
//! with the ingest crate's keys and roles.

/// What a call needs to be allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Run queries and read tables (role `read` and above).
    Query,
    /// Send events (Flight `DoPut`; any key: the sink decides per event what it may cause).
    Ingest,
}

/// Why a call may not go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No or unknown credentials (HTTP 401, gRPC `UNAUTHENTICATED`).
    Unauthenticated(String),
    /// A known caller without the right (HTTP 403, gRPC `PERMISSION_DENIED`).
    Forbidden(String),
}

/// Whose rows a query reads (row-level access, `docs/security.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reader {
    /// Every row: admin keys, and ledgerlake's own components.
    All,
    /// A caller: the id of its key (the `caller` its inferences record) and the address the
    /// key is bound to, if any (whose private datanets it may read: owned or granted).
    Caller { key_id: String, address: Option<ledgerlake_lakehouse::Address> },
}

/// Decides whether an API key may do what a call needs, and whose rows it reads.
pub trait Authorize: Send + Sync + 'static {
    /// `key` is the bare key the caller presented (no `Bearer ` prefix), if any.
    fn authorize(&self, key: Option<&str>, need: Access) -> Result<Reader, Denied>;
}

/// The key of an `Authorization: Bearer <key>` value.
pub fn bearer(authorization: &str) -> Option<&str> {
    authorization
        .strip_prefix("Bearer ")
        .or_else(|| authorization.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}
