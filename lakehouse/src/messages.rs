//! What participants sign: EIP-712 typed data, one struct per participant kind, under the
//! deployment's domain ([`crate::deployment`]). They are part of the data contract
//! (`docs/events.md` lists every struct): changing a field invalidates every signature.
//!
//! Each struct covers the event's id and time and every field that decides what the event
//! does. An absent optional text is signed as the empty string, an absent hash as 32 zero
//! bytes. `eventTime` is the event time in microseconds since the Unix epoch. Because the
//! event id is signed and ingest stores an id once, a signature is usable once; because the
//! domain names the deployment (and chain), it is worthless anywhere else.
//!
//! One definition per kind ([`typed`]) gives both the hash a signer signs
//! ([`signing_hash`]) and the JSON a wallet is shown (`eth_signTypedData_v4`,
//! [`typed_data_json`]).

use alloy_primitives::{B256, keccak256};
use serde_json::{Value, json};

use crate::deployment::Deployment;
use crate::events::{DatanetStatus, Event, Visibility};
use crate::ids::{Address, DatanetId, Sha256Hex, Signature};

/// What a contributor's contribution id is derived from (the id is the sha256 of this
/// text, so the same content in the same datanet always has the same id):
/// `ledgerlake contribution v1\ndatanet:<datanet_id>\nsha256:<hex sha256 of content>`.
pub fn contribution(datanet: &DatanetId, content_sha256: &Sha256Hex) -> String {
    format!("ledgerlake contribution v1\ndatanet:{datanet}\nsha256:{content_sha256}")
}

/// One member of a typed struct.
#[derive(Clone, Debug, PartialEq)]
pub enum Value712 {
    String(String),
    Int64(i64),
    Address(Address),
    Bytes32([u8; 32]),
    Uint256(u128),
    Strings(Vec<String>),
}

impl Value712 {
    fn sol_type(&self) -> &'static str {
        match self {
            Value712::String(_) => "string",
            Value712::Int64(_) => "int64",
            Value712::Address(_) => "address",
            Value712::Bytes32(_) => "bytes32",
            Value712::Uint256(_) => "uint256",
            Value712::Strings(_) => "string[]",
        }
    }

    /// EIP-712 `encodeData` of one member: 32 bytes.
    fn encode(&self) -> [u8; 32] {
        let mut word = [0u8; 32];
        match self {
            Value712::String(s) => word = keccak256(s.as_bytes()).0,
            Value712::Int64(v) => {
                // Two's complement, sign-extended to 256 bits.
                let fill = if *v < 0 { 0xff } else { 0 };
                word = [fill; 32];
                word[24..].copy_from_slice(&v.to_be_bytes());
            }
            Value712::Address(a) => word[12..].copy_from_slice(a.as_bytes()),
            Value712::Bytes32(b) => word = *b,
            Value712::Uint256(v) => word[16..].copy_from_slice(&v.to_be_bytes()),
            Value712::Strings(items) => {
                let mut all = Vec::with_capacity(32 * items.len());
                for s in items {
                    all.extend_from_slice(keccak256(s.as_bytes()).as_slice());
                }
                word = keccak256(&all).0;
            }
        }
        word
    }

    fn to_json(&self) -> Value {
        match self {
            Value712::String(s) => json!(s),
            Value712::Int64(v) => json!(v),
            Value712::Address(a) => json!(a.to_string()),
            Value712::Bytes32(b) => json!(format!("0x{}", hex::encode(b))),
            // Decimal digits: what wallets and eth_account read for a uint256 past 2^53.
            Value712::Uint256(v) => json!(v.to_string()),
            Value712::Strings(items) => json!(items),
        }
    }
}

/// A participant event as the typed struct its signer signs.
#[derive(Clone, Debug, PartialEq)]
pub struct Typed {
    /// The struct's name (EIP-712 `primaryType`).
    pub primary: &'static str,
    pub members: Vec<(&'static str, Value712)>,
}

impl Typed {
    /// `Primary(type name,...)`.
    pub fn encode_type(&self) -> String {
        let members: Vec<String> = self.members.iter().map(|(n, v)| format!("{} {n}", v.sol_type())).collect();
        format!("{}({})", self.primary, members.join(","))
    }

    /// EIP-712 `hashStruct`.
    pub fn hash_struct(&self) -> B256 {
        let mut data = Vec::with_capacity(32 * (self.members.len() + 1));
        data.extend_from_slice(keccak256(self.encode_type().as_bytes()).as_slice());
        for (_, v) in &self.members {
            data.extend_from_slice(&v.encode());
        }
        keccak256(&data)
    }

    /// What the signer signs: `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct)`.
    pub fn signing_hash(&self, deployment: &Deployment) -> B256 {
        let mut data = Vec::with_capacity(66);
        data.extend_from_slice(&[0x19, 0x01]);
        data.extend_from_slice(deployment.domain().separator().as_slice());
        data.extend_from_slice(self.hash_struct().as_slice());
        keccak256(&data)
    }
}

fn text(s: &str) -> Value712 {
    Value712::String(s.to_owned())
}
fn opt_text(s: Option<&str>) -> Value712 {
    Value712::String(s.unwrap_or_default().to_owned())
}
fn time(t: chrono::DateTime<chrono::Utc>) -> Value712 {
    Value712::Int64(t.timestamp_micros())
}
fn hash32(hex64: &str) -> Value712 {
    let mut b = [0u8; 32];
    // Sha256Hex and ContributionId are 64 lowercase hex digits by construction.
    hex::decode_to_slice(hex64, &mut b).unwrap_or_default();
    Value712::Bytes32(b)
}
fn visibility(v: Option<Visibility>) -> Value712 {
    opt_text(v.map(|v| match v {
        Visibility::Private => "private",
        Visibility::Public => "public",
    }))
}
fn status(s: Option<DatanetStatus>) -> Value712 {
    opt_text(s.map(|s| match s {
        DatanetStatus::Active => "active",
        DatanetStatus::Archived => "archived",
    }))
}

/// The typed struct of a participant event (`None` for the kinds no participant signs).
pub fn typed(event: &Event) -> Option<Typed> {
    let (primary, members): (&'static str, Vec<(&'static str, Value712)>) = match event {
        Event::DatanetCreated(d) => (
            "DatanetCreated",
            vec![
                ("eventId", text(d.event_id.as_str())),
                ("eventTime", time(d.event_time)),
                ("datanetId", text(d.datanet_id.as_str())),
                ("owner", Value712::Address(d.owner)),
                ("name", text(&d.name)),
                ("description", text(&d.description)),
                ("license", text(&d.license)),
                ("visibility", visibility(d.visibility)),
            ],
        ),
        Event::DatanetUpdated(d) => (
            "DatanetUpdated",
            vec![
                ("eventId", text(d.event_id.as_str())),
                ("eventTime", time(d.event_time)),
                ("datanetId", text(d.datanet_id.as_str())),
                ("updatedBy", Value712::Address(d.updated_by)),
                ("name", opt_text(d.name.as_deref())),
                ("description", opt_text(d.description.as_deref())),
                ("license", opt_text(d.license.as_deref())),
                ("status", status(d.status)),
                ("visibility", visibility(d.visibility)),
            ],
        ),
        Event::ContributionSubmitted(c) => (
            "ContributionSubmitted",
            vec![
                ("eventId", text(c.event_id.as_str())),
                ("eventTime", time(c.event_time)),
                ("datanetId", text(c.datanet_id.as_str())),
                ("contributor", Value712::Address(c.contributor)),
                // The content's hash stands for the content (computed here, not trusted).
                ("contentSha256", hash32(Sha256Hex::digest(c.content.as_bytes()).as_str())),
                ("license", text(&c.license)),
                ("language", opt_text(c.language.as_deref())),
                ("source", opt_text(c.source.as_deref())),
                ("tags", Value712::Strings(c.tags.clone())),
            ],
        ),
        Event::ContributionReviewed(r) => (
            "ContributionReviewed",
            vec![
                ("eventId", text(r.event_id.as_str())),
                ("eventTime", time(r.event_time)),
                ("contributionId", hash32(r.contribution_id.as_str())),
                ("datanetId", text(r.datanet_id.as_str())),
                ("reviewer", Value712::Address(r.reviewer)),
                ("verdict", text(r.verdict.as_str())),
                ("reason", opt_text(r.reason.as_deref())),
            ],
        ),
        Event::AccessGranted(a) => (
            "AccessGranted",
            vec![
                ("eventId", text(a.event_id.as_str())),
                ("eventTime", time(a.event_time)),
                ("datanetId", text(a.datanet_id.as_str())),
                ("builder", Value712::Address(a.builder)),
                ("grantedBy", Value712::Address(a.granted_by)),
            ],
        ),
        Event::AccessRevoked(a) => (
            "AccessRevoked",
            vec![
                ("eventId", text(a.event_id.as_str())),
                ("eventTime", time(a.event_time)),
                ("datanetId", text(a.datanet_id.as_str())),
                ("builder", Value712::Address(a.builder)),
                ("revokedBy", Value712::Address(a.revoked_by)),
            ],
        ),
        Event::AccessRequested(a) => (
            "AccessRequested",
            vec![
                ("eventId", text(a.event_id.as_str())),
                ("eventTime", time(a.event_time)),
                ("datanetId", text(a.datanet_id.as_str())),
                ("builder", Value712::Address(a.builder)),
                ("message", opt_text(a.message.as_deref())),
            ],
        ),
        Event::ModelRegistered(m) => (
            "ModelRegistered",
            vec![
                ("eventId", text(m.event_id.as_str())),
                ("eventTime", time(m.event_time)),
                ("modelId", text(m.model_id.as_str())),
                ("builder", Value712::Address(m.builder)),
                ("baseModel", text(&m.base_model)),
                ("adapterUri", text(&m.adapter_uri)),
                ("datanets", Value712::Strings(m.datanets.iter().map(|d| format!("{}@{}", d.datanet_id, d.version)).collect())),
                ("pricePer1kInput", Value712::Uint256(m.price_per_1k_input.base_units())),
                ("pricePer1kOutput", Value712::Uint256(m.price_per_1k_output.base_units())),
                ("trainingRunId", opt_text(m.training_run_id.as_deref())),
                ("contributionsSha256", m.contributions_sha256.as_ref().map_or(Value712::Bytes32([0; 32]), |h| hash32(h.as_str()))),
            ],
        ),
        _ => return None,
    };
    Some(Typed { primary, members })
}

/// The hash the signer of a participant event signs under `deployment`.
pub fn signing_hash(event: &Event, deployment: &Deployment) -> Option<B256> {
    typed(event).map(|t| t.signing_hash(deployment))
}

/// The account that must sign a participant event, and the signature it carries.
pub fn signer(event: &Event) -> Option<(Address, Option<&Signature>)> {
    match event {
        Event::DatanetCreated(d) => Some((d.owner, d.signature.as_ref())),
        Event::DatanetUpdated(d) => Some((d.updated_by, d.signature.as_ref())),
        Event::ContributionSubmitted(c) => Some((c.contributor, Some(&c.signature))),
        Event::ContributionReviewed(r) => Some((r.reviewer, Some(&r.signature))),
        Event::AccessGranted(a) => Some((a.granted_by, a.signature.as_ref())),
        Event::AccessRevoked(a) => Some((a.revoked_by, Some(&a.signature))),
        Event::AccessRequested(a) => Some((a.builder, Some(&a.signature))),
        Event::ModelRegistered(m) => Some((m.builder, m.signature.as_ref())),
        _ => None,
    }
}

/// The EIP-712 domain as typed-data JSON.
pub fn domain_json(deployment: &Deployment) -> Value {
    let mut d = json!({"name": crate::deployment::DOMAIN_NAME, "version": crate::deployment::DOMAIN_VERSION});
    if let Some(c) = deployment.chain_id {
        d["chainId"] = json!(c);
    }
    d["salt"] = json!(deployment.id.to_string());
    d
}

fn domain_types(deployment: &Deployment) -> Value {
    let mut t = vec![json!({"name": "name", "type": "string"}), json!({"name": "version", "type": "string"})];
    if deployment.chain_id.is_some() {
        t.push(json!({"name": "chainId", "type": "uint256"}));
    }
    t.push(json!({"name": "salt", "type": "bytes32"}));
    Value::Array(t)
}

/// The whole typed data of a participant event, as `eth_signTypedData_v4` and
/// `eth_account.messages.encode_typed_data(full_message=...)` take it.
pub fn typed_data_json(event: &Event, deployment: &Deployment) -> Option<Value> {
    let t = typed(event)?;
    let members: Vec<Value> = t.members.iter().map(|(n, v)| json!({"name": n, "type": v.sol_type()})).collect();
    let message: serde_json::Map<String, Value> = t.members.iter().map(|(n, v)| ((*n).to_owned(), v.to_json())).collect();
    Some(json!({
        "types": {"EIP712Domain": domain_types(deployment), t.primary: members},
        "primaryType": t.primary,
        "domain": domain_json(deployment),
        "message": message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_sol_types::{SolStruct, sol};

    sol! {
        struct ModelRegistered {
            string eventId; int64 eventTime; string modelId; address builder; string baseModel; string adapterUri;
            string[] datanets; uint256 pricePer1kInput; uint256 pricePer1kOutput; string trainingRunId; bytes32 contributionsSha256;
        }
        struct ContributionReviewed {
            string eventId; int64 eventTime; bytes32 contributionId; string datanetId; address reviewer; string verdict; string reason;
        }
    }

    fn deployment() -> Deployment {
        Deployment { id: crate::Bytes32::from_bytes([7; 32]), chain_id: Some(1337) }
    }

    /// The hand-written encoding equals alloy's `sol!` structs (the reference EIP-712
    /// implementation in Rust), for a kind with every member type and one with a negative
    /// time and an absent reason.
    #[test]
    fn typed_hashes_equal_alloys_sol_structs() {
        let event: Event = serde_json::from_value::<crate::events::ModelRegistered>(json!({
            "event_id": "reg-1", "event_time": "2026-12-07T10:00:00.123456Z", "model_id": "m-1",
            "builder": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "base_model": "ledgerlake-base",
            "adapter_uri": "adapters/m-1", "datanets": [{"datanet_id": "atlas", "version": 3}, {"datanet_id": "b", "version": 0}],
            "price_per_1k_input": "99999999999999999999999999999999", "price_per_1k_output": "7",
            "contributions_sha256": "00000000000000000000000000000000000000000000000000000000000000ff"
        }))
        .unwrap()
        .into();
        let reference = ModelRegistered {
            eventId: "reg-1".into(),
            eventTime: 1_796_637_600_123_456,
            modelId: "m-1".into(),
            builder: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".parse().unwrap(),
            baseModel: "ledgerlake-base".into(),
            adapterUri: "adapters/m-1".into(),
            datanets: vec!["atlas@3".into(), "b@0".into()],
            pricePer1kInput: alloy_primitives::U256::from(99_999_999_999_999_999_999_999_999_999_999u128),
            pricePer1kOutput: alloy_primitives::U256::from(7u8),
            trainingRunId: String::new(),
            contributionsSha256: B256::with_last_byte(0xff),
        };
        let d = deployment();
        assert_eq!(typed(&event).unwrap().encode_type(), ModelRegistered::eip712_encode_type());
        assert_eq!(signing_hash(&event, &d).unwrap(), reference.eip712_signing_hash(&d.domain()));

        let review: Event = serde_json::from_value::<crate::events::ContributionReviewed>(json!({
            "event_id": "r-1", "event_time": "1969-12-31T23:59:59Z", "contribution_id": "ab".repeat(32),
            "datanet_id": "atlas", "reviewer": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "verdict": "approved",
            "signature": format!("0x{}1b", "11".repeat(64))
        }))
        .unwrap()
        .into();
        let reference = ContributionReviewed {
            eventId: "r-1".into(),
            eventTime: -1_000_000,
            contributionId: B256::repeat_byte(0xab),
            datanetId: "atlas".into(),
            reviewer: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".parse().unwrap(),
            verdict: "approved".into(),
            reason: String::new(),
        };
        assert_eq!(signing_hash(&review, &d).unwrap(), reference.eip712_signing_hash(&d.domain()));
        // Another deployment, or no chain, is another hash.
        let elsewhere = Deployment { chain_id: None, ..d.clone() };
        assert_ne!(signing_hash(&review, &elsewhere), signing_hash(&review, &d));
        // The JSON a wallet is shown names the same struct.
        let j = typed_data_json(&review, &d).unwrap();
        assert_eq!(j["primaryType"], "ContributionReviewed");
        assert_eq!(j["message"]["eventTime"], -1_000_000);
        assert_eq!(j["domain"]["chainId"], 1337);
    }
}
