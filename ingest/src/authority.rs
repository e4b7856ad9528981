//! The one place ingest enforces who may cause an event (the rule of each kind is
//! [`EventKind::authority`], printed in `docs/events.md`). Every event from outside passes
//! [`admit`] before it is queued, whether it came over HTTP or Flight; ledgerlake's own
//! components submit as [`Submitter::Ledgerlake`].
//!
//! What needs the lake's state (is the signer the datanet's owner, does the model id belong
//! to another builder, is the contribution id taken) is checked by the writer in ingest
//! order (`crate::writer`), and so is the event-time skew of participant events, after
//! duplicates are dropped, so re-sending a stored event stays a harmless duplicate.

use ledgerlake_lakehouse::events::{Event, RESERVED_ID_PREFIX};
use ledgerlake_lakehouse::{Authority, Deployment, messages};

use crate::auth::{Principal, Role};

/// Who hands an event to ingest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Submitter {
    /// A caller with an API key (HTTP or Flight).
    Key(Principal),
    /// ledgerlake's own components: serving's spool, the jobs, ModelFactory.
    Ledgerlake,
}

impl Submitter {
    /// Whether participant event times are held to the skew bound (they are for every key;
    /// ledgerlake's own registrations are stamped with the server's clock).
    pub fn from_outside(&self) -> bool {
        matches!(self, Submitter::Key(_))
    }
}

/// A refusal: the field at fault and why.
pub type Refusal = (&'static str, String);

/// Whether `submitter` may cause `event` under `deployment`'s signatures.
pub fn admit(event: &Event, submitter: &Submitter, deployment: &Deployment) -> Result<(), Refusal> {
    let kind = event.kind();
    let Submitter::Key(principal) = submitter else {
        return Ok(());
    };
    match kind.authority() {
        Authority::Ledgerlake => Err(("kind", format!("{kind} events are written only by ledgerlake's epoch job (docs/epochs.md)"))),
        // Nor may any key take an id ledgerlake's own jobs will write.
        _ if event.event_id().as_str().starts_with(RESERVED_ID_PREFIX) => {
            Err(("event_id", format!("event ids starting with {RESERVED_ID_PREFIX:?} are reserved for ledgerlake's own jobs")))
        }
        Authority::Admin if principal.role != Role::Admin => {
            Err(("kind", format!("{kind} events are recorded only with an admin key (docs/security.md); this key is {}", principal.role)))
        }
        Authority::Admin => match event {
            // The record of who voided names the admin key that did.
            Event::EventVoided(v) if v.voided_by != principal.id => {
                Err(("voided_by", format!("voided_by is the id of the admin key that voids ({}), not {:?}", principal.id, v.voided_by)))
            }
            _ => Ok(()),
        },
        Authority::Service if !matches!(principal.role, Role::Service | Role::Admin) => Err((
            "kind",
            format!("{kind} events are written only by ledgerlake's own components or a service key (docs/security.md); this key is {}", principal.role),
        )),
        Authority::Service => Ok(()),
        Authority::Participant { signer, .. } => {
            let Some((account, signature)) = messages::signer(event) else {
                return Err(("kind", format!("{kind} has no signer (a bug in the authority table)")));
            };
            let Some(signature) = signature else {
                return Err(("signature", format!("{kind} is signed by `{signer}` ({account}) with EIP-712 typed data (docs/events.md)")));
            };
            let Some(hash) = messages::signing_hash(event, deployment) else {
                return Err(("kind", format!("{kind} has no typed data (a bug in the authority table)")));
            };
            match signature.recover_hash(&hash.0) {
                Ok(by) if by == account => Ok(()),
                Ok(by) => Err((
                    "signature",
                    format!(
                        "the signature recovers to {by}, not to `{signer}` {account}: sign the event's EIP-712 typed data under this deployment's domain (GET /v1/deployment)"
                    ),
                )),
                Err(e) => Err(("signature", e.0)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledgerlake_lakehouse::EventKind;

    fn key(role: Role) -> Submitter {
        Submitter::Key(Principal { id: "key_test".into(), role, address: None })
    }

    /// For every kind, which roles may send it without a signature: none for participant
    /// kinds, service and admin for service facts, admin for operator decisions, nobody
    /// for what the epoch job writes; ledgerlake itself may write anything.
    #[test]
    fn each_kind_is_admitted_exactly_by_its_rule() {
        let deployment = Deployment { id: ledgerlake_lakehouse::Bytes32::from_bytes([1; 32]), chain_id: None };
        let events = crate::demo::Workload::new(3).events(3000);
        let mut seen = std::collections::BTreeSet::new();
        for event in &events {
            let kind = event.kind();
            if !seen.insert(kind) {
                continue;
            }
            assert!(admit(event, &Submitter::Ledgerlake, &deployment).is_ok(), "{kind}");
            for role in [Role::Read, Role::Ingest, Role::Builder, Role::Service, Role::Admin] {
                let admitted = admit(event, &key(role), &deployment).is_ok();
                let expected = match kind.authority() {
                    // The demo signs under its own deployment, never this one.
                    Authority::Participant { .. } => false,
                    Authority::Service => matches!(role, Role::Service | Role::Admin),
                    Authority::Admin => role == Role::Admin,
                    Authority::Ledgerlake => false,
                };
                assert_eq!(admitted, expected, "{kind} from a {role} key");
            }
        }
        assert!(seen.contains(&EventKind::FeeCharged) && seen.contains(&EventKind::ContributionSubmitted));
    }
}
