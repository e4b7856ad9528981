//! Typed identifiers and units of the data contract.
//!
//! Every id parses from (and displays as) the exact string form stored in the Delta tables,
//! so `FromStr` is the one place where an id is validated. Serde goes through that string form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

/// Why a value does not parse as one of the contract's types. The message is meant for the
/// person who sent the value, so it says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A 20-byte EVM address. Parses `0x` + 40 hex digits; mixed case must be a valid EIP-55
/// checksum. Displays (and is stored) in EIP-55 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(alloy_primitives::Address);

impl Address {
    pub fn from_bytes(bytes: [u8; 20]) -> Self {
        Self(alloy_primitives::Address::from(bytes))
    }
    pub fn as_bytes(&self) -> &[u8; 20] {
        self.0.as_ref()
    }
    pub fn to_alloy(self) -> alloy_primitives::Address {
        self.0
    }
}

impl From<alloy_primitives::Address> for Address {
    fn from(a: alloy_primitives::Address) -> Self {
        Self(a)
    }
}

impl FromStr for Address {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let Some(hex_part) = s.strip_prefix("0x") else {
            return err("an address starts with 0x");
        };
        if hex_part.len() != 40 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return err("an address is 0x followed by 40 hex digits");
        }
        let lower = hex_part.bytes().all(|b| !b.is_ascii_uppercase());
        let upper = hex_part.bytes().all(|b| !b.is_ascii_lowercase());
        if lower || upper {
            let mut bytes = [0u8; 20];
            // Length and digits were checked just above, so decoding cannot fail.
            hex::decode_to_slice(hex_part, &mut bytes).map_err(|e| ParseError(e.to_string()))?;
            return Ok(Self::from_bytes(bytes));
        }
        alloy_primitives::Address::parse_checksummed(s, None)
            .map(Self)
            .map_err(|_| ParseError("address has mixed case but an invalid EIP-55 checksum".into()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_checksum(None))
    }
}
impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
serde_via_str!(Address);

const ADDRESS_PATTERN: &str = "^0x[0-9a-fA-F]{40}$";
impl utoipa::PartialSchema for Address {
    fn schema() -> RefOr<Schema> {
        string_schema(ADDRESS_PATTERN, Some(42), "A 20-byte EVM address: 0x and 40 hex digits; mixed case must be a valid EIP-55 checksum.")
    }
}
impl utoipa::ToSchema for Address {}

/// Defines a string id newtype whose characters are checked by `$valid`.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $valid:expr, $pattern:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                let valid: fn(&str) -> bool = $valid;
                if s.is_empty() || s.len() > $max {
                    return err(format!("{} must be 1 to {} characters", $what, $max));
                }
                if !valid(s) {
                    return err(format!("{} has characters outside its alphabet: {:?}", $what, s));
                }
                Ok(Self(s.to_owned()))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
        serde_via_str!($name);
        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string_schema($pattern, Some($max), concat!("A `", $what, "` (docs/events.md)."))
            }
        }
        impl utoipa::ToSchema for $name {}
    };
}

/// The JSON Schema of a type written as a string matching `pattern` (for the API document;
/// the test `schema_patterns_match_the_parsers` checks each pattern against its parser).
fn string_schema(pattern: &str, max_length: Option<usize>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(max_length)
        .description(Some(description))
        .into()
}

/// What [`opaque_id`], [`slug`] and [`sha256_hex`] accept, as JSON Schema patterns.
const OPAQUE_PATTERN: &str = "^[A-Za-z0-9_.:-]+$";
const SLUG_PATTERN: &str = "^[a-z0-9][a-z0-9_.-]*$";
const SHA256_PATTERN: &str = "^[0-9a-f]{64}$";
const BYTES32_PATTERN: &str = "^0x[0-9a-f]{64}$";

/// Producer-chosen ids (event and inference ids): letters, digits and `_ . : -`.
fn opaque_id(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Slugs name things people type (datanets, models): lowercase letters, digits and `_ . -`,
/// starting with a letter or digit.
fn slug(s: &str) -> bool {
    s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

fn bytes32_hex(s: &str) -> bool {
    s.len() == 66 && s.starts_with("0x") && sha256_hex(&s[2..])
}

fn sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

string_id!(
    /// The idempotency key of an event, chosen by its producer (a UUIDv7 is a good choice).
    EventId, "event_id", 128, opaque_id, OPAQUE_PATTERN
);
string_id!(
    /// One inference served by a model.
    InferenceId, "inference_id", 128, opaque_id, OPAQUE_PATTERN
);
string_id!(
    /// A curated data collection.
    DatanetId, "datanet_id", 64, slug, SLUG_PATTERN
);
string_id!(
    /// A registered model (a LoRA adapter or a base model).
    ModelId, "model_id", 128, slug, SLUG_PATTERN
);
string_id!(
    /// Content address of a contribution: lowercase hex sha256 of its signed message, so the
    /// same content in the same datanet always has the same id.
    ContributionId, "contribution_id", 64, sha256_hex, SHA256_PATTERN
);
string_id!(
    /// Lowercase hex sha256 of some bytes.
    Sha256Hex, "sha256", 64, sha256_hex, SHA256_PATTERN
);

string_id!(
    /// 32 bytes as the EVM writes them: `0x` and 64 lowercase hex digits (a Merkle root).
    Bytes32, "bytes32", 66, bytes32_hex, BYTES32_PATTERN
);

impl Bytes32 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(format!("0x{}", hex::encode(bytes)))
    }
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        // Checked when it was parsed: 64 hex digits after `0x`.
        hex::decode_to_slice(&self.0[2..], &mut out).unwrap_or_default();
        out
    }
}

impl ContributionId {
    /// The id of a contribution is the sha256 of the exact message its contributor signs.
    pub fn for_message(message: &str) -> Self {
        Self(Sha256Hex::digest(message.as_bytes()).0)
    }
}

impl Sha256Hex {
    pub fn digest(bytes: &[u8]) -> Self {
        use sha2::Digest;
        Self(hex::encode(sha2::Sha256::digest(bytes)))
    }
}

/// A token amount in integer base units (1 OPEN = 10^18 base units).
///
/// Stored as Arrow `Decimal128(38, 0)`, so the largest amount is 10^38 - 1. JSON carries it
/// as a string of decimal digits (numbers that fit in 64 bits are accepted too, because JSON
/// numbers lose precision past 2^53 in most clients).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Amount(u128);

impl Amount {
    /// Base units in one OPEN.
    pub const ONE_OPEN: Amount = Amount(1_000_000_000_000_000_000);
    /// The largest amount a `Decimal128(38, 0)` column holds.
    pub const MAX: Amount = Amount(99_999_999_999_999_999_999_999_999_999_999_999_999);
    pub const ZERO: Amount = Amount(0);

    pub fn new(base_units: u128) -> Result<Self, ParseError> {
        if base_units > Self::MAX.0 {
            return err("amount exceeds 10^38 - 1 base units");
        }
        Ok(Self(base_units))
    }
    pub const fn base_units(self) -> u128 {
        self.0
    }
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).and_then(|v| Amount::new(v).ok())
    }
    /// The value as the `i128` an Arrow `Decimal128(38, 0)` column stores. Lossless because
    /// `MAX` < `i128::MAX`.
    pub fn as_decimal128(self) -> i128 {
        self.0 as i128
    }
}

impl FromStr for Amount {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.starts_with('-') {
            return err("amount must not be negative");
        }
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return err("amount must be a whole number of base units written as decimal digits");
        }
        let v: u128 = s.parse().map_err(|_| ParseError("amount exceeds 10^38 - 1 base units".into()))?;
        Amount::new(v)
    }
}
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Amount({})", self.0)
    }
}
impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative whole number of base units, as a string of digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Amount, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Amount, E> {
                Ok(Amount(v as u128))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                u64::try_from(v).map(|v| Amount(v as u128)).map_err(|_| E::custom("amount must not be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Amount, E> {
                Err(E::custom("amount must be a whole number of base units, not a fraction or a float"))
            }
        }
        d.deserialize_any(V)
    }
}

const AMOUNT_PATTERN: &str = "^[0-9]{1,38}$";
impl utoipa::PartialSchema for Amount {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(string_schema(AMOUNT_PATTERN, Some(38), "Base units (1 OPEN = 10^18) as decimal digits."))
            // Below 2^64 (the bound is exact as a float; u64::MAX is not).
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).exclusive_maximum(Some(18_446_744_073_709_551_616.0)))
            .description(Some("A token amount in integer base units, at most 10^38 - 1: a string of digits, or a JSON integer below 2^64."))
            .into()
    }
}
impl utoipa::ToSchema for Amount {}

/// A 65-byte secp256k1 signature (r, s, v) as `0x` + 130 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(alloy_primitives::Signature);

impl Signature {
    pub fn from_alloy(sig: alloy_primitives::Signature) -> Self {
        Self(sig)
    }
    /// All zeros: recovers to no address. What an event holds before it is signed.
    pub fn placeholder() -> Self {
        Self(alloy_primitives::Signature::new(alloy_primitives::U256::ZERO, alloy_primitives::U256::ZERO, false))
    }
    /// Recovers the address that made this EIP-191 `personal_sign` signature over `message`.
    pub fn recover_personal_sign(&self, message: &str) -> Result<Address, ParseError> {
        self.0
            .recover_address_from_msg(message.as_bytes())
            .map(Address)
            .map_err(|e| ParseError(format!("signature does not recover to an address: {e}")))
    }
    /// Recovers the address that signed the 32-byte `hash` (an EIP-712 signing hash).
    pub fn recover_hash(&self, hash: &[u8; 32]) -> Result<Address, ParseError> {
        self.0
            .recover_address_from_prehash(&alloy_primitives::B256::from(*hash))
            .map(Address)
            .map_err(|e| ParseError(format!("signature does not recover to an address: {e}")))
    }
}
impl FromStr for Signature {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let Some(h) = s.strip_prefix("0x") else { return err("a signature starts with 0x") };
        let mut bytes = [0u8; 65];
        if h.len() != 130 || hex::decode_to_slice(h, &mut bytes).is_err() {
            return err("a signature is 0x followed by 130 hex digits (65 bytes r, s, v)");
        }
        alloy_primitives::Signature::from_raw_array(&bytes)
            .map(Self)
            .map_err(|e| ParseError(format!("not a valid secp256k1 signature: {e}")))
    }
}
impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0.as_bytes()))
    }
}
impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
serde_via_str!(Signature);

const SIGNATURE_PATTERN: &str = "^0x[0-9a-fA-F]{130}$";
impl utoipa::PartialSchema for Signature {
    fn schema() -> RefOr<Schema> {
        string_schema(SIGNATURE_PATTERN, Some(132), "A secp256k1 signature (EIP-712 typed data, docs/events.md): 0x and 130 hex digits (r, s, v).")
    }
}
impl utoipa::ToSchema for Signature {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A string the schema pattern allows, up to `max` characters (anchors dropped, `+`
    /// bounded, which the pattern language of proptest needs).
    fn matching(pattern: &str, max: usize) -> impl Strategy<Value = String> {
        let body = pattern.trim_start_matches('^').trim_end_matches('$').replace('+', &format!("{{0,{}}}", max - 1)).replace("]*", &format!("]{{0,{}}}", max - 1));
        proptest::string::string_regex(&body).unwrap().prop_filter("within the length limit", move |s| !s.is_empty() && s.len() <= max)
    }

    proptest! {
        /// What the API document promises is what the parsers accept: every string matching
        /// a type's schema pattern (within its length) parses as that type.
        #[test]
        fn schema_patterns_match_the_parsers(
            opaque in matching(OPAQUE_PATTERN, 128),
            slug in matching(SLUG_PATTERN, 64),
            sha in matching(SHA256_PATTERN, 64),
            bytes32 in matching(BYTES32_PATTERN, 66),
            // Mixed case must also be a valid checksum, which no pattern says: lowercase here.
            address in matching("^0x[0-9a-f]{40}$", 42),
            signature in matching(SIGNATURE_PATTERN, 132),
            amount in matching(AMOUNT_PATTERN, 38),
        ) {
            prop_assert!(opaque.parse::<EventId>().is_ok(), "{opaque}");
            prop_assert!(opaque.parse::<InferenceId>().is_ok(), "{opaque}");
            prop_assert!(slug.parse::<DatanetId>().is_ok(), "{slug}");
            prop_assert!(slug.parse::<ModelId>().is_ok(), "{slug}");
            prop_assert!(sha.parse::<ContributionId>().is_ok(), "{sha}");
            prop_assert!(sha.parse::<Sha256Hex>().is_ok(), "{sha}");
            prop_assert!(bytes32.parse::<Bytes32>().is_ok(), "{bytes32}");
            prop_assert!(address.parse::<Address>().is_ok(), "{address}");
            // A signature whose hex is well-formed parses, even when it recovers nothing.
            let parsed = signature.parse::<Signature>();
            prop_assert!(parsed.is_ok() || parsed.as_ref().is_err_and(|e| !e.0.contains("130 hex digits")), "{signature}: {parsed:?}");
            prop_assert!(amount.parse::<Amount>().is_ok(), "{amount}");
        }
    }

    #[test]
    fn address_checksum_rules() {
        let a: Address = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed".parse().unwrap();
        assert_eq!(a.to_string(), "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed");
        assert!("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".parse::<Address>().is_ok());
        let bad = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD".parse::<Address>().unwrap_err();
        assert!(bad.0.contains("checksum"), "{bad}");
        assert!("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed".parse::<Address>().is_err());
        assert!("0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea".parse::<Address>().is_err());
    }

    #[test]
    fn amount_bounds() {
        assert_eq!("0".parse::<Amount>().unwrap(), Amount::ZERO);
        assert_eq!(Amount::MAX.to_string(), "9".repeat(38));
        assert!("9".repeat(38).parse::<Amount>().is_ok());
        assert!(format!("1{}", "0".repeat(38)).parse::<Amount>().unwrap_err().0.contains("exceeds"));
        assert!("-1".parse::<Amount>().unwrap_err().0.contains("negative"));
        assert!("1.5".parse::<Amount>().is_err());
        assert!(serde_json::from_str::<Amount>("-3").is_err());
        assert!(serde_json::from_str::<Amount>("2.0").is_err());
        assert_eq!(serde_json::from_str::<Amount>("12").unwrap(), Amount::new(12).unwrap());
        assert_eq!(serde_json::to_string(&Amount::ONE_OPEN).unwrap(), "\"1000000000000000000\"");
    }

    #[test]
    fn slugs_and_opaque_ids() {
        assert!("climate-papers".parse::<DatanetId>().is_ok());
        assert!("Climate".parse::<DatanetId>().is_err());
        assert!("-x".parse::<DatanetId>().is_err());
        assert!("".parse::<EventId>().is_err());
        assert!("01890a5d-ac96-774b-bcce-b302099a8057".parse::<EventId>().is_ok());
        assert!("a b".parse::<EventId>().is_err());
        assert!("x".repeat(129).parse::<EventId>().is_err());
    }

    proptest! {
        #[test]
        fn amount_roundtrips_through_its_string(v in 0u128..=Amount::MAX.base_units()) {
            let a = Amount::new(v).unwrap();
            prop_assert_eq!(a.to_string().parse::<Amount>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            prop_assert_eq!(serde_json::from_str::<Amount>(&json).unwrap(), a);
        }

        #[test]
        fn address_roundtrips_through_eip55(bytes in proptest::array::uniform20(any::<u8>())) {
            let a = Address::from_bytes(bytes);
            prop_assert_eq!(a.to_string().parse::<Address>().unwrap(), a);
            prop_assert_eq!(a.to_string().to_lowercase().parse::<Address>().unwrap(), a);
        }
    }
}
