//! Keys and EIP-712 signatures for the participants who sign their own actions
//! (contributions, reviews, datanets, grants, registrations): what `ledgerlake keys new` and
//! `ledgerlake sign` do, and what the demo workload uses.

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use ledgerlake_lakehouse::events::Event;
use ledgerlake_lakehouse::ids::{Address, Signature};
use ledgerlake_lakehouse::{Deployment, messages};

/// A secp256k1 key pair for signing contributions and reviews.
pub struct Keypair(PrivateKeySigner);

impl Keypair {
    pub fn random() -> Self {
        Self(PrivateKeySigner::random())
    }

    /// From a `0x`-prefixed (or bare) 64-hex-digit private key.
    pub fn from_hex(private_key: &str) -> Result<Self, String> {
        private_key
            .trim()
            .parse::<PrivateKeySigner>()
            .map(Self)
            .map_err(|e| format!("not a secp256k1 private key: {e}"))
    }

    /// Deterministic key from a seed (for reproducible demo data; never for real funds).
    pub fn from_seed(seed: &[u8]) -> Self {
        use sha2::Digest;
        let mut material = sha2::Sha256::digest(seed);
        loop {
            if let Ok(k) = PrivateKeySigner::from_slice(&material) {
                return Self(k);
            }
            material = sha2::Sha256::digest(material);
        }
    }

    pub fn address(&self) -> Address {
        Address::from(self.0.address())
    }

    pub fn private_key_hex(&self) -> String {
        format!("0x{}", hex::encode(self.0.to_bytes()))
    }

    /// Signs a participant event's EIP-712 typed data under `deployment` and puts the
    /// signature in it (filling a contribution's derived id and hash too). Errors for a kind
    /// no participant signs.
    pub fn sign_event(&self, event: &mut Event, deployment: &Deployment) -> Result<(), String> {
        let hash = messages::signing_hash(event, deployment).ok_or_else(|| format!("{} is not signed by a participant", event.kind()))?;
        let signature = self.0.sign_hash_sync(&hash).map(Signature::from_alloy).map_err(|e| format!("signing failed: {e}"))?;
        match event {
            Event::DatanetCreated(d) => d.signature = Some(signature),
            Event::DatanetUpdated(d) => d.signature = Some(signature),
            Event::ContributionSubmitted(c) => {
                let digest = ledgerlake_lakehouse::Sha256Hex::digest(c.content.as_bytes());
                c.contribution_id = Some(ledgerlake_lakehouse::ContributionId::for_message(&messages::contribution(&c.datanet_id, &digest)));
                c.content_sha256 = Some(digest);
                c.signature = signature;
            }
            Event::ContributionReviewed(r) => r.signature = signature,
            Event::AccessGranted(a) => a.signature = Some(signature),
            Event::AccessRevoked(a) => a.signature = signature,
            Event::AccessRequested(a) => a.signature = signature,
            Event::ModelRegistered(m) => m.signature = Some(signature),
            other => return Err(format!("{} is not signed by a participant", other.kind())),
        }
        Ok(())
    }

    /// EIP-191 `personal_sign` of the UTF-8 bytes of `message`.
    pub fn personal_sign(&self, message: &str) -> Result<Signature, String> {
        self.0
            .sign_message_sync(message.as_bytes())
            .map(Signature::from_alloy)
            .map_err(|e| format!("signing failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_recover_to_the_signer() {
        let k = Keypair::from_seed(b"alice");
        let sig = k.personal_sign("hello").unwrap();
        assert_eq!(sig.recover_personal_sign("hello").unwrap(), k.address());
        assert_ne!(sig.recover_personal_sign("hello!").unwrap(), k.address());
        let again = Keypair::from_hex(&k.private_key_hex()).unwrap();
        assert_eq!(again.address(), k.address());
    }

    /// A signed event is admitted from any key under its deployment, and refused under
    /// another deployment, with a field changed after signing, or signed by someone else.
    #[test]
    fn signed_events_are_admitted_only_as_signed() {
        use crate::authority::{Submitter, admit};
        let deployment = Deployment { id: ledgerlake_lakehouse::Bytes32::from_bytes([9; 32]), chain_id: Some(1337) };
        let owner = Keypair::from_seed(b"owner");
        let reader = Submitter::Key(crate::Principal { id: "key_r".into(), role: crate::Role::Read, address: None });
        let mut event: Event = serde_json::from_value::<ledgerlake_lakehouse::events::DatanetUpdated>(serde_json::json!({
            "event_id": "u-1", "event_time": "2026-12-07T10:00:00Z", "datanet_id": "atlas",
            "updated_by": owner.address().to_string(), "visibility": "public"
        }))
        .unwrap()
        .into();
        assert_eq!(admit(&event, &reader, &deployment).unwrap_err().0, "signature", "unsigned");
        owner.sign_event(&mut event, &deployment).unwrap();
        admit(&event, &reader, &deployment).unwrap();
        let elsewhere = Deployment { chain_id: None, ..deployment.clone() };
        assert_eq!(admit(&event, &reader, &elsewhere).unwrap_err().0, "signature", "another domain");
        let Event::DatanetUpdated(mut changed) = event.clone() else { unreachable!() };
        changed.visibility = Some(ledgerlake_lakehouse::events::Visibility::Private);
        assert_eq!(admit(&changed.into(), &reader, &deployment).unwrap_err().0, "signature", "changed after signing");
        let mut forged = event.clone();
        Keypair::from_seed(b"mallory").sign_event(&mut forged, &deployment).unwrap();
        assert_eq!(admit(&forged, &reader, &deployment).unwrap_err().0, "signature", "signed by another");
    }
}
