//! `StepNumber`: which step of a follow-up rule an outbox row is.
//!
//! The store keeps the 0-based index into the rule's steps (the expiry row comes
//! after the last step); everything a person or a program reads counts from 1: CLI
//! tables and JSON, the read API, the status page, the report, `.eml` file names,
//! Message-IDs and idempotency keys, template variables and logs. Display and
//! Serialize give that 1-based number, so no output converts on its own.

use serde::{Serialize, Serializer};
use std::fmt;

/// A step of a rule: the first step is step 1 wherever it is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StepNumber {
    index: u32,
}

impl StepNumber {
    /// The step at 0-based `index` in the rule's steps (as the store keeps it); a
    /// negative index (a corrupt row) reads as the first step.
    pub fn from_index(index: i64) -> Self {
        StepNumber {
            index: u32::try_from(index).unwrap_or(0),
        }
    }

    /// The step a person names: 1 is the first; `None` for 0.
    pub fn from_number(number: u32) -> Option<Self> {
        number.checked_sub(1).map(|index| StepNumber { index })
    }

    /// The 0-based index into the rule's steps, as stored.
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// The 1-based number shown everywhere.
    pub fn number(self) -> u32 {
        self.index + 1
    }
}

impl fmt::Display for StepNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

impl Serialize for StepNumber {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_index_is_shown_counting_from_one() {
        let first = StepNumber::from_index(0);
        assert_eq!(first.to_string(), "1");
        assert_eq!(serde_json::to_string(&first).unwrap(), "1");
        assert_eq!(first.index(), 0);
        assert_eq!(StepNumber::from_number(3), Some(StepNumber::from_index(2)));
        assert_eq!(StepNumber::from_number(0), None);
        assert_eq!(StepNumber::from_index(-1), first);
    }
}
