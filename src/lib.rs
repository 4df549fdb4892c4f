//! dealsync: pulls deals from CRMs, receives e-commerce and CRM webhooks, maps every
//! source's native stages onto one canonical pipeline, records every stage change,
//! sends follow-ups and reports the funnel.

pub mod webhooks;
