//! The Merkle tree of an epoch's rewards, built exactly as OpenZeppelin's
//! `StandardMerkleTree.of(values, ["address", "uint256"])` builds it, so its root, proofs and
//! JSON dump are the library's and `MerkleProof.verify` accepts the proofs on chain:
//!
//! - a leaf is `keccak256(bytes.concat(keccak256(abi.encode(account, amount))))`;
//! - leaves are sorted by hash and laid out from the end of a flat array of `2n - 1`
//!   nodes; node `i` is the hash of its children `2i + 1` and `2i + 2`, the smaller first;
//! - the root is node 0; a proof is the siblings from the leaf up.
//!
//! Rules: `docs/epochs.md`.

use alloy_primitives::{U256, keccak256};
use ledgerlake_lakehouse::{Address, Amount, Bytes32};
use serde::Serialize;

use crate::Error;

/// The root of an epoch that pays no one (the library refuses an empty tree).
pub const EMPTY_ROOT: [u8; 32] = [0; 32];

/// `keccak256(keccak256(abi.encode(account, amount)))`.
pub fn leaf_hash(account: &Address, amount: Amount) -> [u8; 32] {
    let mut encoded = [0u8; 64];
    encoded[12..32].copy_from_slice(account.as_bytes());
    encoded[32..].copy_from_slice(&U256::from(amount.base_units()).to_be_bytes::<32>());
    keccak256(keccak256(encoded)).0
}

/// The hash of two nodes, the smaller first (OpenZeppelin's commutative `_hashPair`).
pub fn node_hash(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut both = [0u8; 64];
    both[..32].copy_from_slice(lo);
    both[32..].copy_from_slice(hi);
    keccak256(both).0
}

/// Whether `proof` takes the leaf of `(account, amount)` to `root` (`MerkleProof.verify`).
pub fn verify(root: &[u8; 32], account: &Address, amount: Amount, proof: &[[u8; 32]]) -> bool {
    proof.iter().fold(leaf_hash(account, amount), |node, sibling| node_hash(&node, sibling)) == *root
}

/// A tree over leaf hashes laid out as OpenZeppelin lays them out: sorted, from the end of
/// a flat array of `2n - 1` nodes, each inner node the [`node_hash`] of its children. Any
/// contract verifying with sorted pairs (OpenZeppelin's `MerkleProof`, Uniswap's
/// merkle-distributor) accepts its proofs, whatever the leaves hash.
#[derive(Clone, Debug)]
pub struct LeafTree {
    tree: Vec<[u8; 32]>,
    /// `node[i]`: the node of the `i`th leaf given.
    node: Vec<usize>,
}

impl LeafTree {
    /// The tree of `leaves` (non-empty, all different).
    pub fn new(leaves: &[[u8; 32]]) -> Result<Self, Error> {
        if leaves.is_empty() {
            return Err(Error::Invalid("a Merkle tree needs at least one leaf".into()));
        }
        let mut hashed: Vec<([u8; 32], usize)> = leaves.iter().copied().zip(0..).collect();
        // The library sorts leaves by hash (a stable sort; equal hashes mean equal values).
        hashed.sort_by(|a, b| a.0.cmp(&b.0));
        if hashed.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(Error::Invalid("the same leaf appears twice".into()));
        }
        let n = hashed.len();
        let len = 2 * n - 1;
        let mut tree = vec![[0u8; 32]; len];
        let mut node = vec![0usize; n];
        for (leaf, (hash, value)) in hashed.iter().enumerate() {
            tree[len - 1 - leaf] = *hash;
            node[*value] = len - 1 - leaf;
        }
        for i in (0..len - n).rev() {
            tree[i] = node_hash(&tree[2 * i + 1], &tree[2 * i + 2]);
        }
        Ok(Self { tree, node })
    }

    pub fn root(&self) -> [u8; 32] {
        self.tree[0]
    }

    /// Every node, root first.
    pub fn nodes(&self) -> &[[u8; 32]] {
        &self.tree
    }

    /// The node of leaf `index` (in the order given).
    pub fn node_of(&self, index: usize) -> Option<usize> {
        self.node.get(index).copied()
    }

    /// The proof of leaf `index`: the siblings from it up to the root.
    pub fn proof(&self, index: usize) -> Option<Vec<[u8; 32]>> {
        let mut node = *self.node.get(index)?;
        let mut proof = Vec::new();
        while node > 0 {
            let sibling = if node % 2 == 1 { node + 1 } else { node - 1 };
            proof.push(self.tree[sibling]);
            node = (node - 1) / 2;
        }
        Some(proof)
    }
}

/// The tree of `(account, amount)` values in the order given, as
/// `StandardMerkleTree.of(values, ["address", "uint256"])` builds it.
#[derive(Clone, Debug)]
pub struct RewardTree {
    values: Vec<(Address, Amount)>,
    tree: LeafTree,
}

impl RewardTree {
    /// The tree of `values`, which must be non-empty and name each account once.
    pub fn new(values: Vec<(Address, Amount)>) -> Result<Self, Error> {
        let leaves: Vec<[u8; 32]> = values.iter().map(|(a, v)| leaf_hash(a, *v)).collect();
        let tree = LeafTree::new(&leaves).map_err(|_| Error::Invalid("a reward tree needs values, each once".into()))?;
        Ok(Self { values, tree })
    }

    pub fn root(&self) -> [u8; 32] {
        self.tree.root()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn values(&self) -> &[(Address, Amount)] {
        &self.values
    }

    /// The proof of value `index`: the siblings from its leaf up to the root.
    pub fn proof(&self, index: usize) -> Option<Vec<[u8; 32]>> {
        self.tree.proof(index)
    }

    /// The library's JSON dump (`StandardMerkleTree.load` reads it back).
    pub fn dump(&self) -> TreeDump {
        TreeDump {
            format: "standard-v1",
            leaf_encoding: ["address", "uint256"],
            tree: self.tree.nodes().iter().map(|h| Bytes32::from_bytes(*h)).collect(),
            values: self
                .values
                .iter()
                .enumerate()
                .map(|(i, (a, v))| DumpValue { value: (a.to_string(), v.to_string()), tree_index: self.tree.node_of(i).unwrap_or_default() })
                .collect(),
        }
    }
}

/// `StandardMerkleTree.dump()`'s JSON.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TreeDump {
    /// Always `standard-v1`.
    pub format: &'static str,
    /// Always `["address", "uint256"]`.
    #[serde(rename = "leafEncoding")]
    #[schema(value_type = Vec<String>)]
    pub leaf_encoding: [&'static str; 2],
    /// Every node, root first.
    pub tree: Vec<Bytes32>,
    pub values: Vec<DumpValue>,
}

/// One leaf's value and node.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DumpValue {
    /// The account (EIP-55) and the amount in base units (decimal digits).
    #[schema(value_type = Vec<String>)]
    pub value: (String, String),
    #[serde(rename = "treeIndex")]
    pub tree_index: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(i: u8) -> Address {
        Address::from_bytes([i; 20])
    }

    #[test]
    fn every_proof_verifies_and_a_changed_value_does_not() {
        for n in 1..=9u8 {
            let values: Vec<(Address, Amount)> = (1..=n).map(|i| (address(i), Amount::new(u128::from(i) * 1000).unwrap())).collect();
            let tree = RewardTree::new(values.clone()).unwrap();
            assert_eq!(tree.dump().tree.len(), 2 * n as usize - 1);
            for (i, (a, v)) in values.iter().enumerate() {
                let proof = tree.proof(i).unwrap();
                assert!(verify(&tree.root(), a, *v, &proof), "n={n} i={i}");
                assert!(!verify(&tree.root(), a, Amount::new(v.base_units() + 1).unwrap(), &proof));
                if n > 1 {
                    let other = values[(i + 1) % values.len()].0;
                    assert!(!verify(&tree.root(), &other, *v, &proof));
                }
            }
            assert!(tree.proof(n as usize).is_none());
        }
    }

    #[test]
    fn the_order_of_values_does_not_change_the_root() {
        let mut values: Vec<(Address, Amount)> = (1..=7).map(|i| (address(i), Amount::new(u128::from(i)).unwrap())).collect();
        let root = RewardTree::new(values.clone()).unwrap().root();
        values.reverse();
        assert_eq!(RewardTree::new(values).unwrap().root(), root);
    }

    #[test]
    fn empty_and_duplicate_trees_are_refused() {
        assert!(RewardTree::new(vec![]).is_err());
        let v = (address(1), Amount::new(5).unwrap());
        assert!(RewardTree::new(vec![v, v]).is_err());
    }

    /// A one-leaf tree's root is its leaf hash; the leaf of (0x11..11, 10^18) computed by
    /// hand from its ABI encoding.
    #[test]
    fn the_leaf_is_the_double_keccak_of_the_abi_encoding() {
        let a = address(0x11);
        let one = Amount::ONE_OPEN;
        let mut abi = String::from("000000000000000000000000");
        abi.push_str(&"11".repeat(20));
        abi.push_str(&format!("{:064x}", 1_000_000_000_000_000_000u128));
        let inner = keccak256(hex::decode(abi).unwrap());
        assert_eq!(leaf_hash(&a, one), keccak256(inner).0);
        assert_eq!(RewardTree::new(vec![(a, one)]).unwrap().root(), leaf_hash(&a, one));
        // What `StandardMerkleTree.of([[a, "10^18"]], ["address", "uint256"]).root` prints.
        assert_eq!(
            hex::encode(leaf_hash(&a, one)),
            "b38ec842db1cd54e5e5ce48491f1a404551e9726ebda349d0478e189e0996dd4"
        );
    }
}
