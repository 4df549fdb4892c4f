//! `people show`: one person across every connection (`Store::person`), as a table or
//! JSON, the same facts `GET /api/v1/people/{email}` answers with.

use super::context::{CliError, ConfigSource};
use super::ops::{Shown, emails_table, or_dash, show};
use crate::domain::Deal;
use crate::output::{self, Format, Rows, ViewFormat, time};
use crate::store::{PERSON_VIEW_LIMIT, Person};
use std::collections::BTreeSet;

pub async fn people_show(
    source: &ConfigSource,
    email: String,
    format: ViewFormat,
) -> Result<(), CliError> {
    show(
        source,
        format,
        async |_config, store| {
            store
                .person(&email)
                .await?
                .ok_or_else(|| CliError::Usage(format!("expected an email address, got {email:?}")))
        },
        output::to_json,
        render_person,
    )
    .await
}

/// The table of a person's deals or carts, or "none".
fn deals_table(deals: &[Deal]) -> String {
    if deals.is_empty() {
        return "none\n".to_owned();
    }
    let mut rows = Rows::new(vec![
        "id",
        "connection",
        "external_id",
        "title",
        "amount",
        "stage",
        "status",
        "contact",
        "last_activity",
    ]);
    for deal in deals {
        rows.push(vec![
            deal.id.to_string(),
            deal.connection.to_string(),
            deal.external_id.to_string(),
            deal.title.clone(),
            match (deal.amount(), deal.currency) {
                (Some(amount), Some(currency)) => {
                    format!("{} {currency}", amount.to_decimal_string())
                }
                _ => "-".into(),
            },
            match &deal.pipeline {
                Some(pipeline) => format!("{pipeline}.{}", deal.stage),
                None => deal.stage.to_string(),
            },
            deal.status.to_string(),
            or_dash(deal.contact_email.as_ref().map(|e| e.to_string())),
            time(deal.last_activity_at),
        ]);
    }
    rows.render(Format::Table)
}

/// The table form of a person view.
pub fn render_person(person: &Person) -> String {
    let all = || person.deals.iter().chain(&person.carts);
    let connections: BTreeSet<String> = all().map(|d| d.connection.to_string()).collect();
    let addresses: BTreeSet<String> = all()
        .filter_map(|d| d.contact_email.as_ref().map(|e| e.to_string()))
        .collect();
    let companies: BTreeSet<String> = addresses
        .iter()
        .filter_map(|a| crate::domain::people::company_key(a))
        .collect();
    let join = |set: BTreeSet<String>| {
        if set.is_empty() {
            "-".to_owned()
        } else {
            set.into_iter().collect::<Vec<_>>().join(", ")
        }
    };
    let suppressed = match person.suppressions.first() {
        Some(first) => format!(
            "yes: {} ({}, since {})",
            first.email,
            first.reason,
            time(first.created_at)
        ),
        None => "no".to_owned(),
    };
    let facts = vec![
        ("addresses", join(addresses)),
        ("companies", join(companies)),
        ("connections", join(connections)),
        (
            "counts",
            format!(
                "{} deals, {} carts, {} emails (at most {PERSON_VIEW_LIMIT} of each listed)",
                person.deals.len(),
                person.carts.len(),
                person.emails.len()
            ),
        ),
        ("suppressed", suppressed),
    ];
    let mut suppressions = Rows::new(vec!["email", "reason", "source", "since"]);
    for entry in &person.suppressions {
        suppressions.push(vec![
            entry.email.clone(),
            entry.reason.clone(),
            or_dash(entry.source.clone()),
            time(entry.created_at),
        ]);
    }
    let suppressions = if person.suppressions.is_empty() {
        "none\n".to_owned()
    } else {
        suppressions.render(Format::Table)
    };
    Shown::new(format!("Person {}", person.key), facts)
        .section("Deals", &deals_table(&person.deals))
        .section("Carts", &deals_table(&person.carts))
        .section("Emails", &emails_table(&person.emails))
        .section("Suppressions", &suppressions)
        .0
}
