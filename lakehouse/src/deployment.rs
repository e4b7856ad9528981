//! The deployment a lake belongs to: a random 32-byte id made when the lake is first
//! served and kept beside its tables (`_ledgerlake/deployment.json`), plus the EVM chain id
//! when one is configured. Every participant signature names both (the EIP-712 domain's
//! `salt` and `chainId`, [`crate::messages`]), so a signature made for one deployment or
//! chain is worthless on another.
//!
//! Every process serving one lake reads the same id: the first writes it with a
//! conditional create, and a process that loses that race reads the winner's.

use alloy_primitives::{B256, U256};
use alloy_sol_types::Eip712Domain;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::ids::Bytes32;
use crate::{Error, Lake, Result};

/// Where the id lives, relative to the lake's root.
pub const DEPLOYMENT_FILE: &str = "_ledgerlake/deployment.json";

/// The EIP-712 domain's `name` and `version` of every ledgerlake signature.
pub const DOMAIN_NAME: &str = "ledgerlake";
pub const DOMAIN_VERSION: &str = "1";

/// Which deployment (and chain) a signature is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployment {
    pub id: Bytes32,
    pub chain_id: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    deployment_id: Bytes32,
}

impl Deployment {
    /// The EIP-712 domain participants sign under: `{name: "ledgerlake", version: "1",
    /// chainId (when a chain is configured), salt: the deployment id}`.
    pub fn domain(&self) -> Eip712Domain {
        Eip712Domain::new(
            Some(DOMAIN_NAME.into()),
            Some(DOMAIN_VERSION.into()),
            self.chain_id.map(U256::from),
            None,
            Some(B256::from(self.id.to_bytes())),
        )
    }

    /// The lake's deployment id, made (at random) and stored if the lake has none yet.
    pub async fn load_or_create(lake: &Lake, chain_id: Option<u64>) -> Result<Self> {
        let store = lake.root_store()?;
        let path = Path::from(DEPLOYMENT_FILE);
        for _ in 0..3 {
            match store.get(&path).await {
                Ok(found) => {
                    let bytes = found.bytes().await?;
                    let stored: Stored = serde_json::from_slice(&bytes)
                        .map_err(|e| Error::Internal(format!("{DEPLOYMENT_FILE} does not read as a deployment id: {e}")))?;
                    return Ok(Self { id: stored.deployment_id, chain_id });
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let mut id = [0u8; 32];
            let uuid = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
            id[..16].copy_from_slice(uuid.0.as_bytes());
            id[16..].copy_from_slice(uuid.1.as_bytes());
            let stored = Stored { deployment_id: Bytes32::from_bytes(id) };
            let body = serde_json::to_vec_pretty(&stored).map_err(|e| Error::Internal(e.to_string()))?;
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            match store.put_opts(&path, PutPayload::from(body), opts).await {
                Ok(_) => return Ok(Self { id: stored.deployment_id, chain_id }),
                // Another process made it first: read theirs.
                Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Internal(format!("{DEPLOYMENT_FILE} could neither be read nor created")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lake_keeps_one_deployment_id_and_the_chain_changes_the_domain() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(crate::LakeConfig::parse(dir.path().to_str().unwrap()).unwrap());
        let first = Deployment::load_or_create(&lake, None).await.unwrap();
        let again = Deployment::load_or_create(&lake, None).await.unwrap();
        assert_eq!(first, again, "a second start reads the same id");
        let other = Deployment::load_or_create(&Lake::new(crate::LakeConfig::parse(tempfile::tempdir().unwrap().path().to_str().unwrap()).unwrap()), None)
            .await
            .unwrap();
        assert_ne!(first.id, other.id, "another lake is another deployment");
        let on_chain = Deployment { chain_id: Some(1337), ..first.clone() };
        assert_ne!(first.domain().separator(), on_chain.domain().separator());
        assert_ne!(first.domain().separator(), other.domain().separator());
    }
}
