//! Keys and EIP-191 signatures for the people who sign contributions and reviews: what
//! `ledgerlake keys new` and `ledgerlake sign` do, and what the demo workload uses.

use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use ledgerlake_lakehouse::ids::{Address, Signature};

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
}
