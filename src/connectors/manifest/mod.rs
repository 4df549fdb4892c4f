//! Manifest connectors: the built-in manifests (`connectors/*.toml`, compiled in),
//! the user's manifests (the config's `[connectors] dir`), their validation, and the
//! engine that runs them.
//!
//! Boundary: the manifest format (`schema`) is a public contract documented in
//! `docs/connectors.md`. A user file overrides a built-in of the same name.
//! Invariant: every manifest is checked when it is loaded; a broken one is reported
//! with its file, line and key, and nothing runs with it.

pub mod auth;
pub mod engine;
pub mod fields;
pub mod records;
pub mod schema;
pub mod template;
pub mod writeback;

pub use engine::ManifestConnector;
pub use schema::Manifest;

use crate::config::{Problem, locate};
use schema::{FieldSpec, PaginationKind, Request};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The manifests compiled into the binary: (file name, text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "hubspot.toml",
        include_str!("../../../connectors/hubspot.toml"),
    ),
    (
        "pipedrive.toml",
        include_str!("../../../connectors/pipedrive.toml"),
    ),
    (
        "salesforce.toml",
        include_str!("../../../connectors/salesforce.toml"),
    ),
];

/// Every manifest in force, by connector name.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    manifests: BTreeMap<String, (Arc<Manifest>, String)>,
}

impl Catalog {
    /// Loads the built-ins, then the `*.toml` files of `dir` (which override built-ins
    /// of the same name). Every problem of every file is reported.
    pub fn load(dir: Option<&Path>) -> Result<Catalog, Vec<Problem>> {
        let mut catalog = Catalog::default();
        let mut problems = Vec::new();
        for (file, text) in BUILTIN {
            match parse(&format!("connectors/{file}"), text) {
                Ok(manifest) => {
                    catalog.manifests.insert(
                        manifest.name.clone(),
                        (Arc::new(manifest), format!("built-in {file}")),
                    );
                }
                Err(found) => problems.extend(found),
            }
        }
        if let Some(dir) = dir {
            let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                    .collect(),
                Err(error) => {
                    problems.push(Problem {
                        file: dir.display().to_string(),
                        line: None,
                        key: "connectors.dir".into(),
                        message: format!("cannot read the connectors directory: {error}"),
                    });
                    Vec::new()
                }
            };
            files.sort();
            for path in files {
                let name = path.display().to_string();
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(error) => {
                        problems.push(Problem {
                            file: name,
                            line: None,
                            key: String::new(),
                            message: format!("cannot read: {error}"),
                        });
                        continue;
                    }
                };
                match parse(&name, &text) {
                    Ok(manifest) => {
                        catalog
                            .manifests
                            .insert(manifest.name.clone(), (Arc::new(manifest), name));
                    }
                    Err(found) => problems.extend(found),
                }
            }
        }
        if problems.is_empty() {
            Ok(catalog)
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Manifest>> {
        self.manifests.get(name).map(|(m, _)| m.clone())
    }

    /// Connector names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.manifests.keys().cloned().collect()
    }

    /// Where a manifest came from (`built-in hubspot.toml` or a path).
    pub fn origin(&self, name: &str) -> Option<&str> {
        self.manifests.get(name).map(|(_, origin)| origin.as_str())
    }
}

/// Parses and checks one manifest; `file` names it in problems.
pub fn parse(file: &str, text: &str) -> Result<Manifest, Vec<Problem>> {
    let problem = |key: &str, message: String| Problem {
        file: file.to_owned(),
        line: locate(text, key),
        key: key.to_owned(),
        message,
    };
    let value: toml::Value = toml::from_str(text).map_err(|error| {
        vec![Problem {
            file: file.to_owned(),
            line: error.span().map(|span| {
                text.get(..span.start)
                    .unwrap_or(text)
                    .lines()
                    .count()
                    .max(1)
            }),
            key: String::new(),
            message: format!("invalid TOML: {}", error.message()),
        }]
    })?;
    let manifest: Manifest = serde_path_to_error::deserialize(value).map_err(|error| {
        let key = error.path().to_string();
        let key = if key == "." { String::new() } else { key };
        vec![problem(&key, error.into_inner().to_string())]
    })?;
    let mut problems = Vec::new();
    validate(&manifest, &mut |key, message| {
        problems.push(problem(key, message))
    });
    if problems.is_empty() {
        Ok(manifest)
    } else {
        Err(problems)
    }
}

fn check_request(key: &str, request: &Request, report: &mut dyn FnMut(&str, String)) {
    if !request.path.starts_with('/') {
        report(
            &format!("{key}.path"),
            format!("{:?} must start with '/'", request.path),
        );
    }
    let mut texts: Vec<(String, String)> = vec![(format!("{key}.path"), request.path.clone())];
    for (name, value) in &request.query {
        texts.push((format!("{key}.query.{name}"), value.clone()));
    }
    if let Some(body) = &request.body {
        texts.push((
            format!("{key}.body"),
            serde_json::to_string(body).unwrap_or_default(),
        ));
    }
    for (at, text) in texts {
        for name in template::unknown_placeholders(&text) {
            report(
                &at,
                format!(
                    "unknown placeholder {{{name}}} (known: {})",
                    template::KNOWN.join(", ")
                ),
            );
        }
    }
    if let Err(message) = fields::check_path(&request.records) {
        report(&format!("{key}.records"), message);
    }
    let p = &request.pagination;
    let need = |field: &Option<String>, name: &str, report: &mut dyn FnMut(&str, String)| {
        if field.is_none() {
            report(
                &format!("{key}.pagination.{name}"),
                format!("pagination kind {:?} needs {name}", p.kind),
            );
        }
    };
    match p.kind {
        PaginationKind::Cursor => {
            need(&p.next, "next", report);
            if p.param.is_none() && p.body_field.is_none() {
                report(
                    &format!("{key}.pagination"),
                    "a cursor goes in a query parameter (param) or a body field (body_field)"
                        .into(),
                );
            }
        }
        PaginationKind::NextUrl => need(&p.next, "next", report),
        PaginationKind::Offset | PaginationKind::Page => need(&p.param, "param", report),
        PaginationKind::LinkHeader | PaginationKind::None => {}
    }
    for (name, pointer) in [
        ("next", &p.next),
        ("has_more", &p.has_more),
        ("next_offset", &p.next_offset),
    ] {
        if let Some(pointer) = pointer
            && let Err(message) = fields::check_path(pointer)
        {
            report(&format!("{key}.pagination.{name}"), message);
        }
    }
    if request.body.is_some() && request.method == schema::Method::Get {
        report(
            &format!("{key}.body"),
            "a GET request has no body; set method = \"POST\"".into(),
        );
    }
}

fn check_field(
    key: &str,
    spec: &FieldSpec,
    enrichments: &[String],
    report: &mut dyn FnMut(&str, String),
) {
    let paths: Vec<&String> = match spec {
        FieldSpec::Path(path) => vec![path],
        FieldSpec::Full(table) => {
            if table.path.is_none() && table.paths.is_empty() && table.value.is_none() {
                report(key, "needs path, paths or value".into());
            }
            if table.kind == schema::FieldType::Enum && table.map.is_empty() {
                report(&format!("{key}.map"), "an enum field needs a map".into());
            }
            table.path.iter().chain(table.paths.iter()).collect()
        }
    };
    for path in paths {
        if let Err(message) = fields::check_path(path) {
            report(key, message);
        } else if let Some(rest) = path.strip_prefix('@') {
            let name = rest.split('/').next().unwrap_or_default();
            if !enrichments.iter().any(|e| e == name) {
                report(
                    key,
                    format!(
                        "no enrichment named {name:?} (known: {})",
                        enrichments.join(", ")
                    ),
                );
            }
        }
    }
}

/// Checks what serde cannot: pointers, placeholders, pagination, references.
pub fn validate(manifest: &Manifest, report: &mut dyn FnMut(&str, String)) {
    if manifest.name.is_empty()
        || !manifest
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        report(
            "name",
            "lower-case letters, digits, '-' and '_' only".into(),
        );
    }
    if manifest.name == "demo" {
        report(
            "name",
            "\"demo\" is reserved for the built-in demo connector".into(),
        );
    }
    if let Err(error) = url::Url::parse(&manifest.base_url) {
        report("base_url", format!("not a URL: {error}"));
    }
    match manifest.auth.kind {
        schema::AuthKind::Header | schema::AuthKind::Query if manifest.auth.name.is_none() => {
            report(
                "auth.name",
                "auth kinds header and query need the header or parameter name".into(),
            )
        }
        _ => {}
    }
    if let Some(share) = manifest.rate_limit.budget_share
        && !(share > 0.0 && share <= 1.0)
    {
        report(
            "rate_limit.budget_share",
            format!("expected a share above 0 and at most 1, got {share}"),
        );
    }
    if let Some(rps) = manifest.rate_limit.requests_per_second
        && !(rps > 0.0 && rps.is_finite())
    {
        report(
            "rate_limit.requests_per_second",
            format!("expected a positive number, got {rps}"),
        );
    }
    match (
        manifest.rate_limit.window_requests,
        &manifest.rate_limit.window,
    ) {
        (None, None) => {}
        (Some(requests), Some(window)) if requests > 0 && !window.0.is_zero() => {}
        _ => report(
            "rate_limit.window",
            "window_requests and window go together: a positive count and a duration like \"10s\""
                .into(),
        ),
    }
    let deals = &manifest.deals;
    for (key, request) in [
        ("deals.full", Some(&deals.full)),
        (
            "deals.deletes.request",
            deals.deletes.as_ref().map(|d| &d.request),
        ),
        ("deals.one", deals.one.as_ref()),
    ] {
        if request.is_some_and(|request| request.keyset) {
            report(
                &format!("{key}.keyset"),
                "keyset paging restarts at the last modification time read: only [deals.incremental] reads by modification time".into(),
            );
        }
    }
    check_request("deals.full", &deals.full, report);
    if let Some(request) = &deals.incremental {
        check_request("deals.incremental", request, report);
    }
    if let Some(deletes) = &deals.deletes {
        check_request("deals.deletes.request", &deletes.request, report);
    }
    if let Some(request) = &deals.one {
        check_request("deals.one", request, report);
    }
    for (at, optional) in deals.optional.iter().enumerate() {
        if optional
            .refused
            .body_contains
            .as_deref()
            .is_none_or(str::is_empty)
        {
            report(
                &format!("deals.optional[{at}].refused.body_contains"),
                "name the text of the vendor's refusal, so no other error turns this off".into(),
            );
        }
        if optional.text.contains('{') {
            report(
                &format!("deals.optional[{at}].text"),
                "placeholders are not rendered inside optional text".into(),
            );
        }
    }
    let mut enrichments: Vec<String> = Vec::new();
    for (at, step) in deals.enrich.iter().enumerate() {
        let key = format!("deals.enrich[{at}]");
        check_request(&format!("{key}.request"), &step.request, report);
        if enrichments.contains(&step.name) {
            report(
                &format!("{key}.name"),
                format!("enrichment {:?} appears twice", step.name),
            );
        }
        for path in &step.ids {
            check_field(
                &format!("{key}.ids"),
                &FieldSpec::Path(path.clone()),
                &enrichments,
                report,
            );
        }
        if let Err(message) = fields::check_path(&step.id) {
            report(&format!("{key}.id"), message);
        }
        if let Some(active) = &step.active
            && let Err(message) = fields::check_path(active)
        {
            report(&format!("{key}.active"), message);
        }
        for only in &step.only {
            if !matches!(only.as_str(), "full" | "incremental" | "deletes" | "one") {
                report(
                    &format!("{key}.only"),
                    format!("{only:?} is not a read (full, incremental, deletes, one)"),
                );
            }
        }
        if step.list && step.batch.is_some() {
            report(
                &format!("{key}.batch"),
                "a list enrichment reads every record of its request, page by page; batch does not apply".into(),
            );
        }
        if let Some(cache) = &step.cache
            && chrono::Duration::from_std(cache.0)
                .is_ok_and(|cache| cache > crate::store::ENRICHMENT_RETENTION)
        {
            report(
                &format!("{key}.cache"),
                format!(
                    "at most {} days: kept records are deleted after that",
                    crate::store::ENRICHMENT_RETENTION.num_days()
                ),
            );
        }
        enrichments.push(step.name.clone());
    }
    check_field("deals.modified", &deals.modified, &enrichments, report);
    let f = &deals.fields;
    check_field(
        "deals.fields.external_id",
        &f.external_id,
        &enrichments,
        report,
    );
    // The read's cursor (modification time and id) is kept page by page, before the
    // enrichments of the pages run: both come from the record itself.
    for (key, spec) in [
        ("deals.modified", &deals.modified),
        ("deals.fields.external_id", &f.external_id),
    ] {
        let paths: Vec<&String> = match spec {
            FieldSpec::Path(path) => vec![path],
            FieldSpec::Full(table) => table.path.iter().chain(&table.paths).collect(),
        };
        if paths.iter().any(|path| path.starts_with('@')) {
            report(
                key,
                "must be read from the record itself, not from an enrichment".into(),
            );
        }
    }
    check_field(
        "deals.fields.native_stage",
        &f.native_stage,
        &enrichments,
        report,
    );
    for (name, spec) in [
        ("title", &f.title),
        ("amount", &f.amount),
        ("currency", &f.currency),
        ("native_pipeline", &f.native_pipeline),
        ("contact_email", &f.contact_email),
        ("contact_name", &f.contact_name),
        ("company_domain", &f.company_domain),
        ("owner", &f.owner),
        ("owner_email", &f.owner_email),
        ("created_at", &f.created_at),
        ("updated_at", &f.updated_at),
        ("stage_changed_at", &f.stage_changed_at),
        ("expected_close", &f.expected_close),
        ("deleted", &f.deleted),
        ("status", &f.status),
        ("marketing_consent", &f.marketing_consent),
    ] {
        if let Some(spec) = spec {
            check_field(&format!("deals.fields.{name}"), spec, &enrichments, report);
            if let FieldSpec::Full(table) = spec
                && table.kind == schema::FieldType::MinorUnits
                && name != "amount"
            {
                report(
                    &format!("deals.fields.{name}.type"),
                    "minor_units is a type for amount only".into(),
                );
            }
        }
    }
    if let Some(FieldSpec::Full(table)) = &f.marketing_consent {
        use schema::FieldType;
        if !matches!(
            table.kind,
            FieldType::Bool | FieldType::Enum | FieldType::String
        ) {
            report(
                "deals.fields.marketing_consent.type",
                "expected bool, or enum with a map onto \"true\" and \"false\"".into(),
            );
        }
        for (source, target) in &table.map {
            if !matches!(target.as_str(), "true" | "false") {
                report(
                    &format!("deals.fields.marketing_consent.map.{source}"),
                    format!("{target:?} is not \"true\" or \"false\""),
                );
            }
        }
    }
    if let Some(FieldSpec::Full(table)) = &f.status {
        for (source, target) in &table.map {
            if !matches!(target.as_str(), "open" | "won" | "lost" | "deleted") {
                report(
                    &format!("deals.fields.status.map.{source}"),
                    format!("{target:?} is not open, won, lost or deleted"),
                );
            }
        }
    }
    if let Some(pipelines) = &manifest.pipelines {
        check_request("pipelines.request", &pipelines.request, report);
        if pipelines.stages.is_some() != pipelines.stage.is_some() {
            report(
                "pipelines.stage",
                "embedded stages need both stages (pointer) and stage (fields)".into(),
            );
        }
    }
    if let Some(stages) = &manifest.stages {
        check_request("stages.request", &stages.request, report);
        if stages.pipeline.is_none() && stages.single_pipeline.is_none() {
            report(
                "stages.single_pipeline",
                "stages need a pipeline pointer or a single_pipeline [id, label]".into(),
            );
        }
    }
    for (pipeline, stages) in &manifest.default_mappings {
        for (stage, target) in stages {
            if !target.contains('.') && manifest.default_pipeline.is_none() {
                report(
                    &format!("default_mappings.{pipeline}.{stage}"),
                    format!(
                        "{target:?} names no pipeline; write \"pipeline.stage\" or set default_pipeline"
                    ),
                );
            }
        }
    }
    if let Some(webhooks) = &manifest.webhooks {
        for (kind, action) in &webhooks.actions {
            if *action == schema::EventAction::Refetch && deals.one.is_none() {
                report(
                    &format!("webhooks.actions.{kind}"),
                    "refetch needs [deals.one]".into(),
                );
            }
        }
    }
    if let Some(writeback) = &manifest.writeback {
        writeback::check(writeback, report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_manifest_loads() {
        let catalog = Catalog::load(None).unwrap_or_else(|problems| {
            panic!(
                "{}",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(catalog.names(), vec!["hubspot", "pipedrive", "salesforce"]);
    }

    #[test]
    fn a_broken_manifest_is_reported_with_file_line_and_key() {
        let text = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"data\"\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n";
        let problems = parse("crm.toml", text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("crm.toml:9: deals.full.records")),
            "{shown:?}"
        );
        let unknown = parse("crm.toml", "name = \"crm\"\nbase_urll = \"x\"\n").unwrap_err();
        assert!(unknown[0].message.contains("unknown field"), "{unknown:?}");
    }

    /// A `[writeback]` whose template names an unknown variable, or whose create is not
    /// idempotent and has no lookup, is refused with the file, line and key.
    #[test]
    fn a_broken_writeback_section_is_reported_with_file_line_and_key() {
        let base = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n";
        let text = format!(
            "{base}[writeback.create]\npath = \"/notes\"\nbody = {{ text = \"{{{{ subjet }}}}\" }}\n"
        );
        let problems = parse("crm.toml", &text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            shown
                .iter()
                .any(|p| p.starts_with("crm.toml:14: writeback.create.body")
                    && p.contains("undefined")
                    && p.contains("subject")),
            "{shown:?}"
        );
        assert!(
            shown
                .iter()
                .any(|p| p.contains("writeback.lookup") && p.contains("idempotent")),
            "{shown:?}"
        );
        let fixed = format!(
            "{base}[writeback.create]\npath = \"/notes\"\nidempotent = true\nbody = {{ text = \"{{{{ subject }}}}\" }}\n"
        );
        assert!(parse("crm.toml", &fixed).is_ok());
    }

    #[test]
    fn an_unknown_webhook_scheme_or_action_is_refused_naming_the_known_ones() {
        let base = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"/data\"\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n[webhooks]\nscheme = \"shopify\"\nkind = [\"/t\"]\nid = \"/id\"\n[webhooks.actions]\n\"deal.deleted\" = \"delete\"\n";
        assert!(
            parse("crm.toml", base).is_ok(),
            "{:?}",
            parse("crm.toml", base).err()
        );
        let shown = |text: &str| -> Vec<String> {
            parse("crm.toml", text)
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let scheme = shown(&base.replace("\"shopify\"", "\"shopfiy\""));
        assert!(
            scheme
                .iter()
                .any(|p| p.contains("webhooks.scheme") && p.contains("standard_webhooks")),
            "{scheme:?}"
        );
        let action = shown(&base.replace("\"delete\"", "\"remove\""));
        assert!(
            action
                .iter()
                .any(|p| p.contains("webhooks.actions") && p.contains("refetch")),
            "{action:?}"
        );
        let refetch = shown(&base.replace("\"delete\"", "\"refetch\""));
        assert!(
            refetch
                .iter()
                .any(|p| p.contains("refetch needs [deals.one]")),
            "{refetch:?}"
        );
    }

    #[test]
    fn an_enrichment_cache_longer_than_the_retention_is_refused() {
        let text = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"/data\"\n[[deals.enrich]]\nname = \"extra\"\nids = [\"/id\"]\nid = \"/id\"\ncache = \"30d\"\n[deals.enrich.request]\npath = \"/extra\"\nrecords = \"/data\"\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n";
        let problems = parse("crm.toml", text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            shown
                .iter()
                .any(|p| p.contains("deals.enrich[0].cache") && p.contains("at most 7 days")),
            "{shown:?}"
        );
        assert!(parse("crm.toml", &text.replace("30d", "24h")).is_ok());
    }

    #[test]
    fn keyset_paging_is_refused_outside_the_incremental_read() {
        let text = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"/data\"\nkeyset = true\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n";
        let problems = parse("crm.toml", text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert!(
            shown
                .iter()
                .any(|p| p.contains("deals.full.keyset") && p.contains("[deals.incremental]")),
            "{shown:?}"
        );
        assert!(parse("crm.toml", &text.replace("keyset = true\n", "")).is_ok());
    }

    #[test]
    fn consent_maps_minor_units_and_optional_text_are_checked() {
        let base = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"/data\"\n";
        let good = format!(
            "{base}[[deals.optional]]\ntext = \", Extra\"\nrefused = {{ status = 400, body_contains = \"No such column 'Extra'\" }}\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\namount = {{ path = \"/value\", type = \"minor_units\" }}\nmarketing_consent = {{ path = \"/optin\", type = \"enum\", map = {{ yes = \"true\", no = \"false\" }} }}\n"
        );
        assert!(
            parse("crm.toml", &good).is_ok(),
            "{:?}",
            parse("crm.toml", &good).err()
        );
        let bad = good
            .replace("no = \"false\"", "no = \"nope\"")
            .replace(
                "body_contains = \"No such column 'Extra'\"",
                "body_contains = \"\"",
            )
            .replace(
                "native_stage = \"/stage\"\n",
                "native_stage = \"/stage\"\ntitle = { path = \"/t\", type = \"minor_units\" }\n",
            );
        let shown: Vec<String> = parse("crm.toml", &bad)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        for key in [
            "deals.fields.marketing_consent.map.no",
            "deals.optional[0].refused.body_contains",
            "deals.fields.title.type",
        ] {
            assert!(shown.iter().any(|p| p.contains(key)), "{key}: {shown:?}");
        }
    }

    #[test]
    fn a_cursor_read_from_an_enrichment_is_refused() {
        let text = "name = \"crm\"\nbase_url = \"http://x\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"@extra/m\"\n[deals.full]\npath = \"/deals\"\nrecords = \"/data\"\n[[deals.enrich]]\nname = \"extra\"\nids = [\"/id\"]\nid = \"/id\"\n[deals.enrich.request]\npath = \"/extra\"\nrecords = \"/data\"\n[deals.fields]\nexternal_id = { paths = [\"/id\", \"@extra/id\"] }\nnative_stage = \"/stage\"\n";
        let problems = parse("crm.toml", text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        for key in ["deals.modified", "deals.fields.external_id"] {
            assert!(
                shown
                    .iter()
                    .any(|p| p.contains(key) && p.contains("from the record itself")),
                "{key}: {shown:?}"
            );
        }
    }
}
