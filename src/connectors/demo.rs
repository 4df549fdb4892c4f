//! The `demo` connector: a synthetic CRM and shop, so a newcomer sees the whole flow
//! with no account anywhere.
//!
//! A world of sales deals (two native pipelines: a software sales one and a real-estate
//! one) and shop carts evolves one tick per `pace`. Deals advance, stall, win and lose;
//! carts are started and some are bought, before or after their follow-ups. The world
//! is a pure function of the seed and the tick number, so a given seed always tells
//! the same story; the cursor keeps the world's start time and the last tick read, so
//! a restart continues the story instead of starting it again.

use super::{BadRecord, Connector, ConnectorError, Page, SyncContext};
use crate::config::ConnectionConfig;
use crate::domain::{Currency, DealStatus, EmailAddress, LineItem, Money, RawRecord, SourceDeal};
use crate::pipeline::{NativePipeline, NativeStage, StageKind};
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Mutex;
use std::time::Duration;

/// The demo's settings, from `[connections.NAME.settings]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSettings {
    pub seed: u64,
    /// Wall time per world tick.
    pub pace: Duration,
    /// How many sales deals the world creates in all.
    pub deals: u32,
    /// How many carts the world creates in all.
    pub carts: u32,
    /// Records per page.
    pub page_size: usize,
}

impl Default for DemoSettings {
    fn default() -> Self {
        DemoSettings {
            seed: 42,
            pace: Duration::from_secs(2),
            deals: 30,
            carts: 24,
            page_size: 50,
        }
    }
}

impl DemoSettings {
    /// Parses the settings table; errors are (key, message).
    pub fn parse(table: &toml::Table) -> Result<Self, (String, String)> {
        let mut settings = DemoSettings::default();
        for (key, value) in table {
            let int = || {
                value.as_integer().filter(|v| *v >= 0).ok_or_else(|| {
                    (
                        key.clone(),
                        format!("expected a non-negative integer, got {value:?}"),
                    )
                })
            };
            match key.as_str() {
                "seed" => settings.seed = int()? as u64,
                "deals" => settings.deals = int()?.min(100_000) as u32,
                "carts" => settings.carts = int()?.min(100_000) as u32,
                "page_size" => settings.page_size = int()?.clamp(1, 1000) as usize,
                "pace" => {
                    let text = value.as_str().ok_or_else(|| {
                        (key.clone(), "expected a duration like \"2s\"".to_owned())
                    })?;
                    settings.pace = crate::config::duration::parse(text)
                        .map_err(|message| (key.clone(), message))?;
                    if settings.pace < Duration::from_millis(10) {
                        return Err((key.clone(), "must be at least 10ms".to_owned()));
                    }
                }
                other => {
                    return Err((
                        other.to_owned(),
                        "unknown setting (known: seed, pace, deals, carts, page_size)".to_owned(),
                    ));
                }
            }
        }
        Ok(settings)
    }
}

const SOFTWARE: (&str, &str, &[&str]) = (
    "software",
    "Software Sales",
    &[
        "Inbound Lead",
        "Referral Partner",
        "Discovery Call",
        "Product Demo",
        "Trial Use",
        "Feedback Collection",
        "License Agreement",
        "Closed Won",
        "Closed Lost",
    ],
);
const REAL_ESTATE: (&str, &str, &[&str]) = (
    "real-estate",
    "Real Estate",
    &[
        "New Inquiry",
        "Qualified Buyer",
        "Property Viewing",
        "Offer Submission",
        "Home Inspection",
        "Closing Agreement",
        "Sold",
        "Fell Through",
    ],
);
const SHOP: (&str, &str, &[&str]) = ("web-shop", "Web Shop", &["Checkout", "Order"]);

const FIRST: &[&str] = &[
    "Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Edsger", "Radia",
];
const LAST: &[&str] = &[
    "Lovelace", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen",
    "Dijkstra", "Perlman",
];
const COMPANIES: &[&str] = &[
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell",
];
const PRODUCTS: &[(&str, i64)] = &[
    ("Espresso grinder", 24900),
    ("Pour-over kettle", 5900),
    ("Coffee beans 1kg", 2800),
    ("Milk jug", 1900),
    ("Scale", 3900),
];
const OWNERS: &[(&str, &str)] = &[
    ("Alice Owner", "alice@example.com"),
    ("Bob Owner", "bob@example.com"),
];

#[derive(Debug, Clone)]
enum Kind {
    /// A sales deal in one of the two native pipelines (index into `[SOFTWARE, REAL_ESTATE]`).
    Sales { pipeline: usize },
    /// A cart; bought at `buy_at` when that tick comes.
    Cart { buy_at: Option<u64> },
}

#[derive(Debug, Clone)]
struct Entity {
    id: String,
    kind: Kind,
    title: String,
    stage: usize,
    status: DealStatus,
    stalled: bool,
    created_tick: u64,
    changed_tick: u64,
    amount_minor: i64,
    currency: &'static str,
    contact: (String, String),
    consent: bool,
    owner: usize,
    items: Vec<LineItem>,
}

/// The simulated world at some tick.
struct World {
    rng: StdRng,
    tick: u64,
    entities: Vec<Entity>,
    created_deals: u32,
    created_carts: u32,
}

impl World {
    fn new(seed: u64) -> Self {
        World {
            rng: StdRng::seed_from_u64(seed),
            tick: 0,
            entities: Vec::new(),
            created_deals: 0,
            created_carts: 0,
        }
    }

    /// The world at tick 0: a first batch of deals and carts, so there is something
    /// to see at once.
    fn start(seed: u64, settings: &DemoSettings) -> Self {
        let mut world = World::new(seed);
        for _ in 0..settings.deals / 3 {
            world.create_deal(settings);
        }
        for _ in 0..settings.carts / 4 {
            world.create_cart(settings);
        }
        world
    }

    fn advance_to(&mut self, target: u64, settings: &DemoSettings) {
        while self.tick < target {
            self.tick += 1;
            self.step(settings);
        }
    }

    fn person(&mut self) -> (String, String) {
        let first = FIRST[self.rng.random_range(0..FIRST.len())];
        let last = LAST[self.rng.random_range(0..LAST.len())];
        (
            format!("{first} {last}"),
            format!("{}.{}", first.to_lowercase(), last.to_lowercase()),
        )
    }

    fn step(&mut self, settings: &DemoSettings) {
        let tick = self.tick;
        // Existing entities move first, so a new one stays put in its first tick.
        for index in 0..self.entities.len() {
            let roll: f64 = self.rng.random();
            let entity = &mut self.entities[index];
            if entity.status != DealStatus::Open {
                continue;
            }
            match entity.kind {
                Kind::Sales { pipeline } => {
                    if entity.stalled {
                        continue;
                    }
                    let stages = [SOFTWARE, REAL_ESTATE][pipeline].2;
                    let last_open = stages.len() - 3;
                    if roll < 0.03 {
                        entity.stage = stages.len() - 1;
                        entity.status = DealStatus::Lost;
                    } else if roll < 0.20 {
                        if entity.stage >= last_open {
                            let won = roll < 0.15;
                            entity.stage = stages.len() - if won { 2 } else { 1 };
                            entity.status = if won {
                                DealStatus::Won
                            } else {
                                DealStatus::Lost
                            };
                        } else {
                            // The referral stage (software, index 1) is an entry stage only.
                            entity.stage += if pipeline == 0 && entity.stage == 0 {
                                2
                            } else {
                                1
                            };
                        }
                    } else {
                        continue;
                    }
                    entity.changed_tick = tick;
                }
                Kind::Cart { buy_at } => {
                    if buy_at == Some(tick) {
                        entity.stage = 1;
                        entity.status = DealStatus::Won;
                        entity.changed_tick = tick;
                    }
                }
            }
        }

        // Large worlds (benchmarks, tests) fill up in about 200 ticks.
        let deals = u32::from(self.rng.random_bool(0.5)) + settings.deals / 200;
        for _ in 0..deals {
            self.create_deal(settings);
        }
        let carts = u32::from(self.rng.random_bool(0.5)) + settings.carts / 200;
        for _ in 0..carts {
            self.create_cart(settings);
        }
    }

    fn create_deal(&mut self, settings: &DemoSettings) {
        let tick = self.tick;
        if self.created_deals < settings.deals {
            self.created_deals += 1;
            let pipeline = self.rng.random_range(0..2);
            let (name, handle) = self.person();
            let company = COMPANIES[self.rng.random_range(0..COMPANIES.len())];
            let referral = pipeline == 0 && self.rng.random_bool(0.15);
            let entity = Entity {
                id: format!("D-{:04}", self.created_deals),
                title: if pipeline == 0 {
                    format!("{company} — {} seats", self.rng.random_range(5..200))
                } else {
                    format!("{name} — {} Elm Street", self.rng.random_range(1..300))
                },
                kind: Kind::Sales { pipeline },
                stage: usize::from(referral),
                status: DealStatus::Open,
                stalled: self.rng.random_bool(0.25),
                created_tick: tick,
                changed_tick: tick,
                amount_minor: self.rng.random_range(20..600) * 10_000,
                currency: if self.rng.random_bool(0.7) {
                    "EUR"
                } else {
                    "USD"
                },
                contact: (name, format!("{handle}@{}.example", company.to_lowercase())),
                consent: true,
                owner: self.rng.random_range(0..OWNERS.len()),
                items: Vec::new(),
            };
            self.entities.push(entity);
        }
    }

    fn create_cart(&mut self, settings: &DemoSettings) {
        let tick = self.tick;
        if self.created_carts < settings.carts {
            self.created_carts += 1;
            // A small pool of shoppers, so some of them leave more than one cart.
            let shopper = self.rng.random_range(0..(settings.carts * 3 / 4).max(1));
            let first = FIRST[shopper as usize % FIRST.len()];
            let last = LAST[(shopper as usize / FIRST.len()) % LAST.len()];
            let buy_roll: f64 = self.rng.random();
            let buy_at = if buy_roll < 0.3 {
                Some(tick + self.rng.random_range(1..4))
            } else if buy_roll < 0.55 {
                Some(tick + self.rng.random_range(15..60))
            } else {
                None
            };
            let mut items = Vec::new();
            for _ in 0..self.rng.random_range(1..4) {
                let (title, price) = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
                items.push(LineItem {
                    title: title.to_owned(),
                    quantity: self.rng.random_range(1..3),
                    unit_price_minor: Some(price),
                    sku: None,
                });
            }
            let total = items
                .iter()
                .map(|i| i.quantity * i.unit_price_minor.unwrap_or(0))
                .sum();
            let entity = Entity {
                id: format!("C-{:04}", self.created_carts),
                title: format!("Cart of {first} {last}"),
                kind: Kind::Cart { buy_at },
                stage: 0,
                status: DealStatus::Open,
                stalled: false,
                created_tick: tick,
                changed_tick: tick,
                amount_minor: total,
                currency: "EUR",
                contact: (
                    format!("{first} {last}"),
                    format!("shopper{shopper}@example.com"),
                ),
                // Some shoppers decline marketing email.
                consent: shopper % 5 != 0,
                owner: 0,
                items,
            };
            self.entities.push(entity);
        }
    }
}

/// The demo connector for one connection.
pub struct DemoConnector {
    settings: DemoSettings,
    /// The world, advanced as time passes. A std mutex: held for pure computation only.
    world: Mutex<Option<World>>,
    /// When the world started (wall clock, ms), once known.
    epoch_ms: Mutex<Option<i64>>,
}

impl DemoConnector {
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        Ok(DemoConnector {
            settings: DemoSettings::parse(&connection.settings)?,
            world: Mutex::new(None),
            epoch_ms: Mutex::new(None),
        })
    }

    pub fn new(settings: DemoSettings) -> Self {
        DemoConnector {
            settings,
            world: Mutex::new(None),
            epoch_ms: Mutex::new(None),
        }
    }

    fn time_of(&self, epoch_ms: i64, tick: u64) -> DateTime<Utc> {
        let ms = epoch_ms + (tick as i64) * self.settings.pace.as_millis() as i64;
        Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
    }

    fn record(&self, entity: &Entity, epoch_ms: i64) -> SourceDeal {
        let (pipeline_id, pipeline_label, stages) = match entity.kind {
            Kind::Sales { pipeline } => [SOFTWARE, REAL_ESTATE][pipeline],
            Kind::Cart { .. } => SHOP,
        };
        let _ = pipeline_label;
        let stage = stages[entity.stage];
        let currency = Currency::parse(entity.currency).expect("demo currencies are valid");
        let mut deal = SourceDeal::new(&entity.id, &entity.title, pipeline_id, stage);
        deal.amount = Some(Money::new(entity.amount_minor, currency));
        deal.contact_name = Some(entity.contact.0.clone());
        deal.contact_email = EmailAddress::parse(&entity.contact.1);
        deal.created_at = Some(self.time_of(epoch_ms, entity.created_tick));
        deal.updated_at = Some(self.time_of(epoch_ms, entity.changed_tick));
        deal.stage_changed_at = deal.updated_at;
        deal.source_status = Some(entity.status);
        match entity.kind {
            Kind::Sales { .. } => {
                let (owner, owner_email) = OWNERS[entity.owner];
                deal.owner = Some(owner.to_owned());
                deal.owner_email = EmailAddress::parse(owner_email);
                deal.expected_close = deal.created_at.map(|at| {
                    (at + chrono::Duration::days(30 + (entity.amount_minor % 60))).date_naive()
                });
            }
            Kind::Cart { .. } => {
                deal.marketing_consent = Some(entity.consent);
                deal.recovery_url = Some(format!(
                    "https://shop.example.com/cart/{}/recover",
                    entity.id
                ));
                deal.line_items = entity.items.clone();
                deal.cart_keys = vec![format!("demo-cart:{}", entity.id)];
            }
        }
        deal.raw = RawRecord::from_value(&json!({
            "id": entity.id,
            "title": entity.title,
            "pipeline": pipeline_id,
            "stage": stage,
            "status": entity.status.as_str(),
            "amount": Money::new(entity.amount_minor, currency).to_decimal_string(),
            "currency": entity.currency,
            "contact": {"name": entity.contact.0, "email": entity.contact.1},
            "accepts_marketing": entity.consent,
            "stalled": entity.stalled,
            "created_tick": entity.created_tick,
            "changed_tick": entity.changed_tick,
        }));
        deal
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DemoCursor {
    epoch_ms: i64,
    /// Changes up to this tick have been read; `None`: nothing yet (a full read).
    seen_tick: Option<u64>,
    /// While paging through one tick's changes: the tick being read, and how far.
    #[serde(default)]
    reading: Option<(u64, usize)>,
}

fn native(spec: (&str, &str, &[&str]), won: &str, lost: &str) -> NativePipeline {
    NativePipeline {
        id: spec.0.to_owned(),
        label: spec.1.to_owned(),
        stages: spec
            .2
            .iter()
            .enumerate()
            .map(|(order, label)| NativeStage {
                id: (*label).to_owned(),
                label: (*label).to_owned(),
                order: order as i64,
                probability: None,
                kind: Some(if *label == won {
                    StageKind::Won
                } else if *label == lost {
                    StageKind::Lost
                } else {
                    StageKind::Open
                }),
                rot_after: None,
            })
            .collect(),
    }
}

#[async_trait]
impl Connector for DemoConnector {
    fn kind(&self) -> &str {
        "demo"
    }

    fn default_pipeline(&self) -> Option<&str> {
        Some("sales")
    }

    fn gives_owner_email(&self) -> bool {
        true
    }

    async fn discover_pipelines(
        &self,
        _cx: &SyncContext,
    ) -> Result<Vec<NativePipeline>, ConnectorError> {
        Ok(vec![
            native(SOFTWARE, "Closed Won", "Closed Lost"),
            native(REAL_ESTATE, "Sold", "Fell Through"),
            native(SHOP, "Order", ""),
        ])
    }

    /// A full read keeps the stored world's clock: run beside the daemon (another
    /// process), `sync --full` then re-reads the daemon's story instead of a new one
    /// that would move every deal back to where it started.
    fn full_read_cursor(&self, stored: Option<&serde_json::Value>) -> Option<serde_json::Value> {
        let stored: DemoCursor = serde_json::from_value(stored?.clone()).ok()?;
        let cursor = DemoCursor {
            epoch_ms: stored.epoch_ms,
            seen_tick: None,
            reading: None,
        };
        Some(serde_json::to_value(cursor).expect("cursor serializes"))
    }

    async fn fetch_page(
        &self,
        _cx: &SyncContext,
        cursor: Option<&serde_json::Value>,
    ) -> Result<Page, ConnectorError> {
        let now_ms = Utc::now().timestamp_millis();
        let cursor: DemoCursor = match cursor {
            Some(value) => serde_json::from_value(value.clone()).map_err(|error| {
                ConnectorError::BadResponse {
                    vendor: "demo".into(),
                    reason: format!("unreadable cursor: {error}"),
                }
            })?,
            // A full read keeps the running world's clock, so `sync --full` re-reads
            // the same story instead of starting a new one.
            None => DemoCursor {
                epoch_ms: self.epoch_ms.lock().ok().and_then(|e| *e).unwrap_or(now_ms),
                seen_tick: None,
                reading: None,
            },
        };
        if let Ok(mut epoch) = self.epoch_ms.lock() {
            *epoch = Some(cursor.epoch_ms);
        }
        let pace_ms = self.settings.pace.as_millis().max(1) as i64;
        let (target, offset) = cursor
            .reading
            .unwrap_or((((now_ms - cursor.epoch_ms).max(0) / pace_ms) as u64, 0));

        let mut guard = self
            .world
            .lock()
            .map_err(|_| ConnectorError::Poisoned { what: "demo world" })?;
        if guard.as_ref().is_none_or(|world| world.tick > target) {
            *guard = Some(World::start(self.settings.seed, &self.settings));
        }
        let world = guard.as_mut().expect("set just above");
        world.advance_to(target, &self.settings);

        let changed: Vec<&Entity> = world
            .entities
            .iter()
            .filter(|e| cursor.seen_tick.is_none_or(|seen| e.changed_tick > seen))
            .collect();
        let page: Vec<Result<SourceDeal, BadRecord>> = changed
            .iter()
            .skip(offset)
            .take(self.settings.page_size)
            .map(|entity| Ok(self.record(entity, cursor.epoch_ms)))
            .collect();
        let read = offset + page.len();
        let done = read >= changed.len();
        let next = if done {
            DemoCursor {
                epoch_ms: cursor.epoch_ms,
                seen_tick: Some(target),
                reading: None,
            }
        } else {
            DemoCursor {
                epoch_ms: cursor.epoch_ms,
                seen_tick: cursor.seen_tick,
                reading: Some((target, read)),
            }
        };
        Ok(Page {
            records: page,
            next: serde_json::to_value(next).expect("cursor serializes"),
            done,
            requests: 1,
            rate_limited: 0,
            unchanged: 0,
            cache: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn story(seed: u64, ticks: u64) -> Vec<(String, usize, DealStatus)> {
        let settings = DemoSettings {
            seed,
            ..DemoSettings::default()
        };
        let mut world = World::start(seed, &settings);
        world.advance_to(ticks, &settings);
        world
            .entities
            .iter()
            .map(|e| (e.id.clone(), e.stage, e.status))
            .collect()
    }

    #[test]
    fn a_seed_always_tells_the_same_story() {
        assert_eq!(story(7, 80), story(7, 80));
        assert_ne!(story(7, 80), story(8, 80));
    }

    #[test]
    fn the_world_wins_loses_stalls_and_buys_within_a_minute_of_ticks() {
        let settings = DemoSettings::default();
        let mut world = World::start(settings.seed, &settings);
        world.advance_to(60, &settings);
        let sales = |status| {
            world
                .entities
                .iter()
                .filter(|e| matches!(e.kind, Kind::Sales { .. }) && e.status == status)
                .count()
        };
        assert!(sales(DealStatus::Won) > 0, "some deals are won");
        assert!(sales(DealStatus::Lost) > 0, "some deals are lost");
        assert!(world.entities.iter().any(|e| e.stalled), "some deals stall");
        let carts: Vec<_> = world
            .entities
            .iter()
            .filter(|e| matches!(e.kind, Kind::Cart { .. }))
            .collect();
        assert!(
            carts.iter().any(|e| e.status == DealStatus::Won),
            "some carts are bought"
        );
        assert!(
            carts.iter().any(|e| e.status == DealStatus::Open),
            "some carts are left"
        );
        assert!(
            carts.iter().any(|e| !e.consent),
            "some shoppers decline marketing"
        );
    }

    /// A context for connection `demo`, and a runtime to drive the connector's reads on
    /// this test's thread.
    fn context() -> (SyncContext, tokio::runtime::Runtime) {
        let cx = SyncContext::new(
            crate::domain::ConnectionName::new("demo"),
            tokio_util::sync::CancellationToken::new(),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        (cx, runtime)
    }

    #[test]
    fn paging_through_the_world_with_interruptions_delivers_every_entity() {
        // Read in small pages, dropping every third page as a failed commit would, and
        // resuming from the last committed cursor: nothing may be skipped.
        let connector = DemoConnector::new(DemoSettings {
            pace: Duration::from_millis(10),
            deals: 300,
            carts: 100,
            page_size: 7,
            ..DemoSettings::default()
        });
        let (cx, runtime) = context();
        let mut seen = std::collections::HashSet::new();
        let mut committed: Option<serde_json::Value> = None;
        let mut calls = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.len() < 400 {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} seen",
                seen.len()
            );
            calls += 1;
            let page = runtime
                .block_on(connector.fetch_page(&cx, committed.as_ref()))
                .unwrap();
            if calls % 3 == 0 {
                continue; // this page's commit failed: neither records nor cursor kept
            }
            for record in page.records {
                seen.insert(record.unwrap().external_id);
            }
            committed = Some(page.next);
            std::thread::sleep(Duration::from_millis(3));
        }
    }

    #[test]
    fn a_connector_that_cannot_read_one_record_says_so_instead_of_calling_it_deleted() {
        // A webhook refetch answered `None` deletes the deal: a connector without a
        // single-record read must answer an error (the delivery is dead-lettered, the
        // deal kept), never `None`.
        let connector = DemoConnector::new(DemoSettings::default());
        let (cx, runtime) = context();
        let answer = runtime.block_on(connector.fetch_one(&cx, "d-1"));
        match answer {
            Err(ConnectorError::BadResponse { reason, .. }) => {
                assert!(reason.contains("d-1"), "{reason}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn settings_are_checked() {
        let table: toml::Table = toml::from_str("seed = 3\npace = \"500ms\"").unwrap();
        let settings = DemoSettings::parse(&table).unwrap();
        assert_eq!(
            (settings.seed, settings.pace),
            (3, Duration::from_millis(500))
        );
        let table: toml::Table = toml::from_str("sead = 3").unwrap();
        assert_eq!(DemoSettings::parse(&table).unwrap_err().0, "sead");
        let table: toml::Table = toml::from_str("pace = \"2\"").unwrap();
        assert!(DemoSettings::parse(&table).unwrap_err().1.contains("unit"));
    }
}
