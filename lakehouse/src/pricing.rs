//! What a price per 1,000 tokens means and what one inference costs: the fee rule of the
//! data contract, in exact integer arithmetic.
//!
//! A fee is `floor((prompt_tokens · per_1k_input + completion_tokens · per_1k_output) /
//! 1000)` base units. The limits make that rule total: an inference has at most
//! [`MAX_INFERENCE_TOKENS`] tokens, and a price is at most [`MAX_PRICE_PER_1K`], chosen so
//! that `MAX_INFERENCE_TOKENS · MAX_PRICE_PER_1K <= Amount::MAX`. Every fee of an allowed
//! inference at an allowed price is therefore an [`Amount`], and no intermediate product
//! leaves `u128`. Ingest refuses a `model.registered` whose price is over the limit and an
//! `inference.completed` with more tokens, so nothing in the lake can make a fee overflow.

use crate::ids::Amount;

/// The most tokens (prompt and completion together) one inference may have. Far above any
/// context length served today (2^24 = 16,777,216).
pub const MAX_INFERENCE_TOKENS: u64 = 1 << 24;

/// The highest price per 1,000 tokens: the largest price at which the longest inference's
/// product still fits an [`Amount`] (about 5.96·10^30 base units, 5.96·10^12 OPEN).
pub const MAX_PRICE_PER_1K: u128 = Amount::MAX.base_units() / MAX_INFERENCE_TOKENS as u128;

/// Why a price or a fee is refused. Both are the caller's fault: the numbers are out of
/// the contract's range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("{field} is {value} base units; the most a price per 1,000 tokens may be is {max}", max = MAX_PRICE_PER_1K)]
    PriceTooHigh { field: &'static str, value: Amount },
    #[error("{tokens} tokens in one inference; the most is {max}", max = MAX_INFERENCE_TOKENS)]
    TooManyTokens { tokens: u128 },
}

/// A model's price in base units per 1,000 prompt (input) and completion (output) tokens.
/// Only a price within [`MAX_PRICE_PER_1K`] can be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Price {
    per_1k_input: Amount,
    per_1k_output: Amount,
}

impl Price {
    /// A price of nothing (a model served for free).
    pub const FREE: Price = Price { per_1k_input: Amount::ZERO, per_1k_output: Amount::ZERO };

    pub fn new(per_1k_input: Amount, per_1k_output: Amount) -> Result<Self, PricingError> {
        check_price("price_per_1k_input", per_1k_input)?;
        check_price("price_per_1k_output", per_1k_output)?;
        Ok(Self { per_1k_input, per_1k_output })
    }

    pub fn per_1k_input(self) -> Amount {
        self.per_1k_input
    }

    pub fn per_1k_output(self) -> Amount {
        self.per_1k_output
    }

    /// The fee of one inference, rounded down to whole base units. Refuses more than
    /// [`MAX_INFERENCE_TOKENS`] tokens; never overflows.
    pub fn fee(self, prompt_tokens: u64, completion_tokens: u64) -> Result<Amount, PricingError> {
        let tokens = u128::from(prompt_tokens) + u128::from(completion_tokens);
        if tokens > u128::from(MAX_INFERENCE_TOKENS) {
            return Err(PricingError::TooManyTokens { tokens });
        }
        // Within the limits each product is at most MAX_INFERENCE_TOKENS · MAX_PRICE_PER_1K
        // and their sum at most that too (the token counts share one budget), which is at
        // most Amount::MAX: the checks below cannot fail, they guard the reasoning.
        let overflow = || PricingError::TooManyTokens { tokens };
        let input = u128::from(prompt_tokens).checked_mul(self.per_1k_input.base_units()).ok_or_else(overflow)?;
        let output = u128::from(completion_tokens).checked_mul(self.per_1k_output.base_units()).ok_or_else(overflow)?;
        let total = input.checked_add(output).ok_or_else(overflow)?;
        Amount::new(total / 1000).map_err(|_| overflow())
    }
}

/// Refuses a price per 1,000 tokens above [`MAX_PRICE_PER_1K`]; `field` names it in the error.
pub fn check_price(field: &'static str, value: Amount) -> Result<(), PricingError> {
    if value.base_units() > MAX_PRICE_PER_1K {
        return Err(PricingError::PriceTooHigh { field, value });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::U256;
    use proptest::prelude::*;

    fn price(i: u128, o: u128) -> Price {
        Price::new(Amount::new(i).unwrap(), Amount::new(o).unwrap()).unwrap()
    }

    #[test]
    fn fees_are_integer_base_units_rounded_down() {
        let open = Amount::ONE_OPEN.base_units();
        assert_eq!(price(open, 2 * open).fee(1000, 1000).unwrap().base_units(), 3 * open);
        assert_eq!(price(999, 0).fee(1, 0).unwrap(), Amount::ZERO);
        assert_eq!(price(1000, 1000).fee(3, 7).unwrap().base_units(), 10);
        assert_eq!(price(open, open).fee(0, 0).unwrap(), Amount::ZERO);
    }

    #[test]
    fn the_longest_inference_at_the_highest_price_is_an_amount() {
        let max = price(MAX_PRICE_PER_1K, MAX_PRICE_PER_1K);
        let fee = max.fee(MAX_INFERENCE_TOKENS / 2, MAX_INFERENCE_TOKENS / 2).unwrap();
        assert_eq!(fee.base_units(), MAX_INFERENCE_TOKENS as u128 * MAX_PRICE_PER_1K / 1000);
        assert!(MAX_INFERENCE_TOKENS as u128 * MAX_PRICE_PER_1K <= Amount::MAX.base_units());
        assert!(max.fee(MAX_INFERENCE_TOKENS, 0).is_ok());
    }

    #[test]
    fn prices_above_the_limit_and_too_many_tokens_are_refused() {
        let over = Amount::new(MAX_PRICE_PER_1K + 1).unwrap();
        assert_eq!(
            Price::new(Amount::ZERO, over),
            Err(PricingError::PriceTooHigh { field: "price_per_1k_output", value: over })
        );
        assert!(Price::new(Amount::MAX, Amount::ZERO).is_err());
        assert_eq!(price(1, 1).fee(MAX_INFERENCE_TOKENS, 1), Err(PricingError::TooManyTokens { tokens: (1 << 24) + 1 }));
        assert!(price(1, 1).fee(u64::MAX, u64::MAX).is_err());
    }

    proptest! {
        /// The fee is the exact rational formula rounded down, computed here in 256 bits,
        /// for any price and token counts within the limits; outside them it is an error,
        /// never a panic.
        #[test]
        fn fee_equals_the_exact_formula_rounded_down(
            pin in 0..=MAX_PRICE_PER_1K,
            pout in 0..=MAX_PRICE_PER_1K,
            prompt in 0..=MAX_INFERENCE_TOKENS,
            completion in 0..=MAX_INFERENCE_TOKENS,
        ) {
            let exact = (U256::from(prompt) * U256::from(pin) + U256::from(completion) * U256::from(pout)) / U256::from(1000u32);
            let got = price(pin, pout).fee(prompt, completion);
            if prompt + completion <= MAX_INFERENCE_TOKENS {
                prop_assert_eq!(U256::from(got.unwrap().base_units()), exact);
            } else {
                prop_assert!(got.is_err());
            }
        }

        #[test]
        fn fee_never_panics(pin in any::<u128>(), pout in any::<u128>(), prompt in any::<u64>(), completion in any::<u64>()) {
            if let (Ok(i), Ok(o)) = (Amount::new(pin), Amount::new(pout))
                && let Ok(p) = Price::new(i, o)
            {
                let _ = p.fee(prompt, completion);
            }
        }
    }
}
