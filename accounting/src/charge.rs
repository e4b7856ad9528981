//! The events one completion produces.
//!
//! A completion is charged `price.fee(prompt_tokens, completion_tokens)` (see
//! [`ledgerlake_lakehouse::pricing`]) to its caller. Its event ids are derived from the
//! inference id (`<inference_id>:inference`, `<inference_id>:fee`), so writing the same
//! completion twice (a replay after a crash) is a duplicate, never a second charge.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ledgerlake_lakehouse::events::{Event, FeeCharged, InferenceCited, InferenceCompleted, InferenceTokens};
use ledgerlake_lakehouse::ids::{EventId, InferenceId, ModelId, Sha256Hex};
use ledgerlake_lakehouse::Price;

use crate::{Error, Result};

/// A finished (or cancelled) completion, as serving reports it for billing.
#[derive(Clone, Debug, PartialEq)]
pub struct Metered {
    pub inference_id: String,
    /// The adapter's model id, or the base model's.
    pub model_id: String,
    /// The API key id that called, who pays.
    pub caller: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// sha256 of the output text.
    pub output_sha256: Sha256Hex,
    pub latency: Duration,
    /// The price the request was admitted at.
    pub price: Price,
    pub at: DateTime<Utc>,
    /// The prompt's and the output's token ids, for attribution; `None` where the
    /// deployment does not store them (`record_tokens = false`).
    pub token_ids: Option<TokenIds>,
    /// The passages retrieval put into the prompt, most relevant first.
    pub citations: Vec<Cited>,
}

/// One passage of a contribution that retrieval put into a completion's prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Cited {
    pub contribution_id: String,
    pub datanet_id: String,
    /// Which chunk of the contribution.
    pub chunk: u32,
    /// Its BM25 score for the query.
    pub relevance: f64,
}

/// The token ids of one completion, stored as its `inference.tokens` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIds {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
}

fn field<T: std::str::FromStr>(name: &str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| Error::InvalidEvent { field: name.to_owned(), message: e.to_string() })
}

fn tokens(name: &str, n: u64) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::InvalidEvent { field: name.to_owned(), message: format!("{n} does not fit 32 bits") })
}

impl Metered {
    /// The `inference.completed` and `fee.charged` events of this completion, its
    /// `inference.cited` (one per citation, ids `<inference_id>:cited:<rank>`), then its
    /// `inference.tokens` when it carries token ids.
    pub fn events(&self) -> Result<Vec<Event>> {
        let amount = self.price.fee(self.prompt_tokens, self.completion_tokens)?;
        let inference_id: InferenceId = field("inference_id", &self.inference_id)?;
        let model_id: ModelId = field("model_id", &self.model_id)?;
        let inference = InferenceCompleted {
            event_id: field("event_id", &format!("{}:inference", self.inference_id))?,
            event_time: self.at,
            inference_id: inference_id.clone(),
            model_id: model_id.clone(),
            caller: self.caller.clone(),
            prompt_tokens: tokens("prompt_tokens", self.prompt_tokens)?,
            completion_tokens: tokens("completion_tokens", self.completion_tokens)?,
            output_sha256: self.output_sha256.clone(),
            latency_ms: u32::try_from(self.latency.as_millis()).unwrap_or(u32::MAX),
        };
        let fee = FeeCharged {
            event_id: field::<EventId>("event_id", &format!("{}:fee", self.inference_id))?,
            event_time: self.at,
            inference_id,
            model_id,
            payer: self.caller.clone(),
            amount,
        };
        let mut events = vec![Event::InferenceCompleted(inference), Event::FeeCharged(fee.clone())];
        for (rank, c) in self.citations.iter().enumerate() {
            events.push(Event::InferenceCited(InferenceCited {
                event_id: field("event_id", &format!("{}:cited:{rank}", self.inference_id))?,
                event_time: self.at,
                inference_id: fee.inference_id.clone(),
                model_id: fee.model_id.clone(),
                contribution_id: field("contribution_id", &c.contribution_id)?,
                datanet_id: field("datanet_id", &c.datanet_id)?,
                rank: tokens("rank", rank as u64)?,
                chunk: c.chunk,
                relevance: c.relevance,
            }));
        }
        if let Some(ids) = &self.token_ids {
            events.push(Event::InferenceTokens(InferenceTokens {
                event_id: field("event_id", &format!("{}:tokens", self.inference_id))?,
                event_time: self.at,
                inference_id: fee.inference_id,
                model_id: fee.model_id,
                prompt_token_ids: ids.prompt.clone(),
                output_token_ids: ids.output.clone(),
            }));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledgerlake_lakehouse::Amount;
    use ledgerlake_lakehouse::pricing::{MAX_INFERENCE_TOKENS, MAX_PRICE_PER_1K};

    pub(crate) fn metered(prompt: u64, completion: u64, price: Price) -> Metered {
        Metered {
            inference_id: "cmpl-1".into(),
            model_id: "law-lora".into(),
            caller: "key-1".into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            output_sha256: Sha256Hex::digest(b"out"),
            latency: Duration::from_millis(12),
            price,
            at: Utc::now(),
            token_ids: None,
            citations: vec![],
        }
    }

    #[test]
    fn a_completion_makes_an_inference_and_its_fee_with_derived_ids() {
        let price = Price::new(Amount::new(6_000).unwrap(), Amount::new(54_000).unwrap()).unwrap();
        let mut m = metered(10, 3, price);
        let [inference, fee] = <[Event; 2]>::try_from(m.events().unwrap()).unwrap();
        let (Event::InferenceCompleted(i), Event::FeeCharged(f)) = (inference, fee) else { panic!("kinds") };
        assert_eq!(i.event_id.to_string(), "cmpl-1:inference");
        assert_eq!(f.event_id.to_string(), "cmpl-1:fee");
        assert_eq!((i.prompt_tokens, i.completion_tokens, i.latency_ms), (10, 3, 12));
        assert_eq!(f.amount.base_units(), (10 * 6_000 + 3 * 54_000) / 1000);
        assert_eq!(f.payer, "key-1");
        m.token_ids = Some(TokenIds { prompt: vec![1, 2, 3], output: vec![4, 5, 6] });
        let events = m.events().unwrap();
        let Event::InferenceTokens(t) = &events[2] else { panic!("kind") };
        assert_eq!(t.event_id.to_string(), "cmpl-1:tokens");
        assert_eq!((t.prompt_token_ids.as_slice(), t.output_token_ids.as_slice()), (&[1, 2, 3][..], &[4, 5, 6][..]));
        assert_eq!(t.inference_id, i.inference_id);
    }

    #[test]
    fn citations_become_events_ranked_in_order_before_the_token_ids() {
        let mut m = metered(10, 3, Price::FREE);
        let contribution = "ab".repeat(32);
        m.citations = vec![
            Cited { contribution_id: contribution.clone(), datanet_id: "law".into(), chunk: 2, relevance: 7.5 },
            Cited { contribution_id: contribution.clone(), datanet_id: "law".into(), chunk: 0, relevance: 1.25 },
        ];
        m.token_ids = Some(TokenIds { prompt: vec![1], output: vec![2] });
        let events = m.events().unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind().name()).collect();
        assert_eq!(kinds, ["inference.completed", "fee.charged", "inference.cited", "inference.cited", "inference.tokens"]);
        let Event::InferenceCited(c) = &events[3] else { panic!("kind") };
        assert_eq!(c.event_id.to_string(), "cmpl-1:cited:1");
        assert_eq!((c.rank, c.chunk, c.relevance, c.contribution_id.as_str()), (1, 0, 1.25, contribution.as_str()));
        m.citations[0].contribution_id = "not-a-contribution".into();
        assert!(matches!(m.events(), Err(Error::InvalidEvent { field, .. }) if field == "contribution_id"));
    }

    #[test]
    fn an_inference_over_the_token_limit_is_refused_not_wrapped() {
        let max = Price::new(Amount::new(MAX_PRICE_PER_1K).unwrap(), Amount::new(MAX_PRICE_PER_1K).unwrap()).unwrap();
        assert!(matches!(metered(MAX_INFERENCE_TOKENS, 1, max).events(), Err(Error::Pricing(_))));
        let ok = metered(MAX_INFERENCE_TOKENS - 1, 1, max).events().unwrap();
        let Event::FeeCharged(f) = &ok[1] else { panic!("kind") };
        assert_eq!(f.amount.base_units(), MAX_INFERENCE_TOKENS as u128 * MAX_PRICE_PER_1K / 1000);
    }

    #[test]
    fn a_bad_model_id_is_an_invalid_event() {
        let mut m = metered(1, 1, Price::FREE);
        m.model_id = "Not A Slug".into();
        assert!(matches!(m.events(), Err(Error::InvalidEvent { field, .. }) if field == "model_id"));
    }
}
