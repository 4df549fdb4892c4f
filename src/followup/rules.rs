//! The follow-up rules the scheduler and sender work from. They are configuration:
//! defined and validated in [`crate::config::followups`].

pub use crate::config::followups::{
    CART_DEFAULT_DELAYS, Recipient, Rule, RuleKind, Step, template_files,
};
