//! The exact messages that contributors and datanet owners sign (EIP-191 `personal_sign`).
//! They are part of the data contract: changing one byte invalidates every signature.

use crate::events::Verdict;
use crate::ids::{ContributionId, DatanetId, Sha256Hex};

/// What a contributor signs to claim a contribution:
/// `ledgerlake contribution v1\ndatanet:<datanet_id>\nsha256:<hex sha256 of content>`.
pub fn contribution(datanet: &DatanetId, content_sha256: &Sha256Hex) -> String {
    format!("ledgerlake contribution v1\ndatanet:{datanet}\nsha256:{content_sha256}")
}

/// What a datanet owner signs to review a contribution:
/// `ledgerlake review v1\ncontribution:<id>\nverdict:<verdict>`.
pub fn review(contribution: &ContributionId, verdict: Verdict) -> String {
    format!("ledgerlake review v1\ncontribution:{contribution}\nverdict:{}", verdict.as_str())
}
