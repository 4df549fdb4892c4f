//! The two canonical pipelines that apply when the config defines none.

use super::{Pipeline, Stage, StageKind};
use crate::domain::{PipelineKey, StageKey};
use std::time::Duration;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

fn stage(
    key: &str,
    label: &str,
    description: &str,
    probability: u8,
    stall_after_secs: Option<u64>,
    kind: StageKind,
) -> Stage {
    Stage {
        key: StageKey::new(key),
        label: label.to_owned(),
        description: description.to_owned(),
        probability,
        stall_after: stall_after_secs.map(Duration::from_secs),
        kind,
    }
}

/// `sales` and `ecommerce`, as PRODUCT.md describes them.
pub fn default_pipelines() -> Vec<Pipeline> {
    use StageKind::{Lost, Open, Won};
    vec![
        Pipeline {
            key: PipelineKey::new("sales"),
            label: "Sales".to_owned(),
            stages: vec![
                stage(
                    "lead_generation",
                    "Lead Generation",
                    "Entry: a prospect is identified. Exit: first contact made and interest shown.",
                    10,
                    Some(7 * DAY),
                    Open,
                ),
                stage(
                    "lead_qualification",
                    "Lead Qualification",
                    "Entry: interest shown. Exit: budget, need, timing and authority confirmed.",
                    20,
                    Some(7 * DAY),
                    Open,
                ),
                stage(
                    "needs_assessment",
                    "Needs Assessment",
                    "Entry: a qualified lead. Exit: the buyer's requirements are written down and agreed.",
                    40,
                    Some(14 * DAY),
                    Open,
                ),
                stage(
                    "proposal",
                    "Proposal",
                    "Entry: requirements agreed. Exit: a priced proposal was sent and reviewed.",
                    60,
                    Some(14 * DAY),
                    Open,
                ),
                stage(
                    "negotiation",
                    "Negotiation",
                    "Entry: the proposal is under discussion. Exit: terms agreed in principle.",
                    80,
                    Some(14 * DAY),
                    Open,
                ),
                stage(
                    "closing",
                    "Closing",
                    "Entry: terms agreed. Exit: the contract is signed (won) or the buyer walks away (lost).",
                    90,
                    Some(7 * DAY),
                    Open,
                ),
                stage("won", "Won", "The contract is signed.", 100, None, Won),
                stage(
                    "lost",
                    "Lost",
                    "The buyer decided against us.",
                    0,
                    None,
                    Lost,
                ),
                stage(
                    "post_sale",
                    "Post-Sale Follow-Up",
                    "Entry: a won deal. Retention, upsell and cross-sell work; exit when the account is handed over.",
                    100,
                    Some(30 * DAY),
                    Won,
                ),
            ],
        },
        Pipeline {
            key: PipelineKey::new("ecommerce"),
            label: "E-commerce".to_owned(),
            stages: vec![
                stage(
                    "checkout_started",
                    "Checkout Started",
                    "Entry: a shopper started a checkout. Exit: an order arrives, or the cart idles past abandon_after.",
                    30,
                    Some(HOUR),
                    Open,
                ),
                stage(
                    "cart_abandoned",
                    "Cart Abandoned",
                    "Entry: the checkout idled without an order. Exit: an order arrives or the first follow-up is sent.",
                    15,
                    Some(DAY),
                    Open,
                ),
                stage(
                    "follow_up_email",
                    "Follow-Up Email",
                    "Entry: dealsync sent a recovery email. Exit: an order arrives or a discount is offered.",
                    15,
                    Some(2 * DAY),
                    Open,
                ),
                stage(
                    "discount_offer",
                    "Discount Offer",
                    "Entry: dealsync sent the email with a discount code. Exit: an order arrives or the sequence ends.",
                    20,
                    Some(3 * DAY),
                    Open,
                ),
                stage(
                    "purchase_completed",
                    "Purchase Completed",
                    "An order was placed for this cart.",
                    100,
                    None,
                    Won,
                ),
                stage(
                    "expired",
                    "Expired",
                    "The follow-ups are over and no order came.",
                    0,
                    None,
                    Lost,
                ),
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pipelines_are_valid() {
        for pipeline in default_pipelines() {
            assert_eq!(
                pipeline.validate(),
                Vec::<String>::new(),
                "{}",
                pipeline.key
            );
        }
    }
}
