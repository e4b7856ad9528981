//! Who may cause each kind of event, and how that is proven: one rule per kind, the table
//! `docs/events.md` prints. Ingest enforces it in one place (`ledgerlake_ingest::authority`)
//! for HTTP and Flight alike; this crate only states it.
//!
//! - **Participant actions** are signed by the acting account with EIP-712 typed data bound
//!   to the deployment ([`crate::messages`]), whatever API key carries them: a key's role
//!   never stands in for a participant's signature. Their `event_time` must be within the
//!   server's skew bound, and what "first" means for them (who keeps a contribution id, who
//!   owns a model id) is ingest order, never a client's clock.
//! - **Service facts** (inferences, fees, tokens, citations, attributions, training runs)
//!   are written by ledgerlake's own components (serving's spool, the jobs, ModelFactory), or
//!   by a key of the `service` role, which an operator gives an external serving fleet and
//!   trusts as it trusts its own servers.
//! - **Operator decisions** (stakes where no staking contract is followed, voiding an event)
//!   come only with an admin key.
//! - **Derived facts** (epochs, rewards, anchors) are written only by ledgerlake's epoch job.

use crate::events::EventKind;

/// How an event of one kind must be proven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authority {
    /// Signed (EIP-712) by the account named in the field `signer`, sent with any key.
    Participant {
        /// The event's field naming the acting account.
        signer: &'static str,
        /// Whether ledgerlake's own ModelFactory may also write it unsigned, for the builder
        /// it trained for (the builder asked with a key an admin bound to that address).
        factory_may_write: bool,
    },
    /// Written by ledgerlake's own components or a `service` key.
    Service,
    /// Recorded by an admin key (or ledgerlake itself).
    Admin,
    /// Written only by ledgerlake's epoch job; refused from every key.
    Ledgerlake,
}

impl EventKind {
    /// The one rule for this kind (module docs). Exhaustive: a new kind does not compile
    /// until it has one.
    pub fn authority(self) -> Authority {
        let participant = |signer| Authority::Participant { signer, factory_may_write: false };
        match self {
            EventKind::DatanetCreated => participant("owner"),
            EventKind::DatanetUpdated => participant("updated_by"),
            EventKind::ContributionSubmitted => participant("contributor"),
            EventKind::ContributionReviewed => participant("reviewer"),
            EventKind::AccessGranted => participant("granted_by"),
            EventKind::AccessRevoked => participant("revoked_by"),
            EventKind::AccessRequested => participant("builder"),
            EventKind::ModelRegistered => Authority::Participant { signer: "builder", factory_may_write: true },
            EventKind::InferenceCompleted
            | EventKind::FeeCharged
            | EventKind::InferenceTokens
            | EventKind::InferenceCited
            | EventKind::InferenceAttributed
            | EventKind::TrainingRun
            | EventKind::TrainingMetric => Authority::Service,
            EventKind::StakeChanged | EventKind::EventVoided => Authority::Admin,
            EventKind::EpochClosed | EventKind::RewardEarned | EventKind::AnchorLogged => Authority::Ledgerlake,
        }
    }

    /// Kinds only ledgerlake's own epoch job writes (`docs/epochs.md`): `POST /v1/events`
    /// and Flight `DoPut` refuse them, so no API key can forge a reward.
    pub fn derived(self) -> bool {
        self.authority() == Authority::Ledgerlake
    }
}

impl Authority {
    /// How `docs/events.md` names the rule.
    pub fn describe(self) -> String {
        match self {
            Authority::Participant { signer, factory_may_write: false } => format!("participant: EIP-712 signature by `{signer}`"),
            Authority::Participant { signer, factory_may_write: true } => {
                format!("participant: EIP-712 signature by `{signer}` (or ledgerlake's ModelFactory for the builder it trained for)")
            }
            Authority::Service => "service: ledgerlake's own components or a `service` key".into(),
            Authority::Admin => "admin: an admin key (stakes: only ledgerlake's follower of the staking contract, where one is configured)".into(),
            Authority::Ledgerlake => "ledgerlake: the epoch job only".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind has exactly one rule, and each participant rule names a field of the
    /// kind's table that holds an address (the signer).
    #[test]
    fn every_kind_has_exactly_one_rule_and_signers_are_address_fields() {
        for kind in EventKind::ALL {
            let rule = kind.authority();
            assert_eq!(kind.authority(), rule, "a rule is a pure function of the kind");
            if let Authority::Participant { signer, .. } = rule {
                let schema = crate::events::schema(*kind);
                let field = schema.field_with_name(signer).unwrap_or_else(|_| panic!("{kind}: no field {signer}"));
                assert!(!field.is_nullable(), "{kind}: the signer {signer} is always present");
                let sig = schema.field_with_name("signature").unwrap_or_else(|_| panic!("{kind}: no signature column"));
                assert_eq!(sig.data_type(), &arrow::datatypes::DataType::Utf8);
            }
        }
        let derived: Vec<_> = EventKind::ALL.iter().filter(|k| k.derived()).collect();
        assert_eq!(derived, [&EventKind::EpochClosed, &EventKind::RewardEarned, &EventKind::AnchorLogged]);
    }

    /// What pays someone is never a participant's unsigned word: fees, attributions and
    /// stakes, and what only the job writes.
    #[test]
    fn what_moves_money_is_not_a_participant_action() {
        for kind in [EventKind::FeeCharged, EventKind::InferenceAttributed, EventKind::InferenceCited, EventKind::InferenceCompleted] {
            assert_eq!(kind.authority(), Authority::Service, "{kind}");
        }
        assert_eq!(EventKind::StakeChanged.authority(), Authority::Admin);
        assert_eq!(EventKind::EventVoided.authority(), Authority::Admin);
        for kind in [EventKind::RewardEarned, EventKind::EpochClosed, EventKind::AnchorLogged] {
            assert_eq!(kind.authority(), Authority::Ledgerlake, "{kind}");
        }
    }
}
