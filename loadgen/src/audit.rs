//! `loadgen audit`: compares a ledger with what the exchange persisted in PostgreSQL.
//!
//! After load stops it waits (with a deadline) for the pipeline to drain: every acknowledged
//! order of the ledger persisted and the event sequence gap-free and no longer moving. Then:
//!
//! * **lost**: acknowledged (201/202) but not persisted;
//! * **duplicated**: one client order id persisted as more than one order;
//! * **unexpected**: persisted, but the ledger says it was refused (4xx/503), never sent, or
//!   does not list it at all (orders whose fate was uncertain — timeouts, interruptions — are
//!   "in flight" and may go either way);
//! * **trade conservation**: every order's filled quantity equals the sum of its trades, never
//!   exceeds its quantity, and filled + cancelled + expired never exceed it; no order trades
//!   with itself;
//! * **status**: an order answered `filled` is persisted filled;
//! * **sequence**: event sequence numbers run from 1 with no gap.
//!
//! Any violation makes [`AuditReport::passed`] false (and the command exit non-zero).

use crate::ledger::{self, Outcome};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Schema name and version of the audit JSON.
pub const AUDIT_SCHEMA: &str = "loadgen.audit/v1";

/// How many example ids each finding lists.
const SAMPLE: usize = 20;

/// One kind of finding: how many, and a few examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub count: u64,
    pub sample: Vec<String>,
}

impl Finding {
    fn add(&mut self, what: impl Into<String>) {
        self.count += 1;
        if self.sample.len() < SAMPLE {
            self.sample.push(what.into());
        }
    }
}

/// Event sequence numbers as persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SequenceCheck {
    pub events: u64,
    pub min_seq: u64,
    pub max_seq: u64,
    /// Missing sequence numbers between 1 and `max_seq`.
    pub gaps: u64,
}

/// The audit's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub schema: String,
    pub client_id_prefix: String,
    /// New orders in the ledger.
    pub ledger_orders: u64,
    /// Answered 201/202: must be persisted exactly once.
    pub acknowledged: u64,
    /// Fate unknown to the client (timeouts, interruptions, 5xx).
    pub uncertain: u64,
    /// Of those, persisted (the exchange had them after all).
    pub uncertain_persisted: u64,
    /// Refused (4xx, 503) or never sent.
    pub refused: u64,
    /// Orders of this run found in PostgreSQL.
    pub persisted: u64,
    pub lost: Finding,
    pub duplicated: Finding,
    pub unexpected: Finding,
    pub trade_violations: Finding,
    pub status_mismatches: Finding,
    pub sequence: SequenceCheck,
    /// Whether the pipeline drained before the deadline.
    pub drained: bool,
    pub waited_ms: u64,
    pub passed: bool,
}

impl AuditReport {
    /// The table people read.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let line = |t: &mut String, name: &str, f: &Finding| {
            t.push_str(&format!(
                "  {name:<20} {:>8}{}\n",
                f.count,
                if f.sample.is_empty() {
                    String::new()
                } else {
                    format!(
                        "   e.g. {}",
                        f.sample
                            .iter()
                            .take(5)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        };
        t.push_str(&format!(
            "audit of run {}: {}\n",
            self.client_id_prefix,
            if self.passed { "PASSED" } else { "FAILED" }
        ));
        t.push_str(&format!(
            "  ledger orders {}  acknowledged {}  uncertain {} ({} persisted)  refused {}  persisted {}\n",
            self.ledger_orders, self.acknowledged, self.uncertain, self.uncertain_persisted, self.refused, self.persisted
        ));
        line(&mut t, "lost", &self.lost);
        line(&mut t, "duplicated", &self.duplicated);
        line(&mut t, "unexpected", &self.unexpected);
        line(&mut t, "trade violations", &self.trade_violations);
        line(&mut t, "status mismatches", &self.status_mismatches);
        t.push_str(&format!(
            "  events {} (seq {}..{}), gaps {}\n",
            self.sequence.events, self.sequence.min_seq, self.sequence.max_seq, self.sequence.gaps
        ));
        t.push_str(&format!(
            "  pipeline {} after {} ms\n",
            if self.drained {
                "drained"
            } else {
                "DID NOT DRAIN"
            },
            self.waited_ms
        ));
        t
    }
}

/// One persisted order of the run.
#[derive(Debug, Clone)]
struct Persisted {
    copies: u64,
    status: String,
    quantity: i64,
    filled: i64,
}

async fn persisted_orders(
    pool: &PgPool,
    prefix: &str,
) -> anyhow::Result<HashMap<String, Persisted>> {
    let rows = sqlx::query(
        "SELECT client_order_id, count(*) AS copies, max(status) AS status, max(quantity) AS quantity, \
         max(filled_quantity) AS filled FROM orders WHERE starts_with(client_order_id, $1) GROUP BY client_order_id",
    )
    .bind(format!("{prefix}-"))
    .fetch_all(pool)
    .await
    .context("querying orders")?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        out.insert(
            r.try_get::<String, _>("client_order_id")?,
            Persisted {
                copies: r.try_get::<i64, _>("copies")? as u64,
                status: r.try_get::<String, _>("status")?,
                quantity: r.try_get::<i64, _>("quantity")?,
                filled: r.try_get::<i64, _>("filled")?,
            },
        );
    }
    Ok(out)
}

async fn sequence(pool: &PgPool) -> anyhow::Result<SequenceCheck> {
    let r = sqlx::query("SELECT count(*) AS n, coalesce(min(seq), 0) AS lo, coalesce(max(seq), 0) AS hi FROM events")
        .fetch_one(pool)
        .await
        .context("querying events")?;
    let events = r.try_get::<i64, _>("n")? as u64;
    let min_seq = r.try_get::<i64, _>("lo")? as u64;
    let max_seq = r.try_get::<i64, _>("hi")? as u64;
    Ok(SequenceCheck {
        events,
        min_seq,
        max_seq,
        gaps: max_seq.saturating_sub(events),
    })
}

/// Audits `ledger_path` against the database at `database_url`, waiting up to `deadline` for
/// the pipeline to drain.
pub async fn audit(
    ledger_path: &Path,
    database_url: &str,
    deadline: Duration,
) -> anyhow::Result<AuditReport> {
    let ledger = ledger::read(ledger_path)?;
    let prefix = ledger.header.client_id_prefix.clone();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .with_context(|| format!("connecting to {database_url}"))?;

    // The last word per client order id (a ledger has one line per order).
    let mut fate: HashMap<String, (Outcome, Option<String>)> = HashMap::new();
    for e in ledger.entries.iter().filter(|e| e.kind == "new") {
        if let Some(id) = &e.client_order_id {
            fate.insert(id.clone(), (e.outcome, e.status.clone()));
        }
    }
    let acked: HashSet<&String> = fate
        .iter()
        .filter(|(_, (o, _))| o.acknowledged())
        .map(|(k, _)| k)
        .collect();

    let started = Instant::now();
    let mut drained = false;
    let mut last_events = u64::MAX;
    let (orders, seq) = loop {
        let orders = persisted_orders(&pool, &prefix).await?;
        let seq = sequence(&pool).await?;
        let all_there = acked.iter().all(|id| orders.contains_key(*id));
        let stable = seq.events == last_events && seq.gaps == 0;
        if all_there && stable {
            drained = true;
            break (orders, seq);
        }
        if started.elapsed() >= deadline {
            break (orders, seq);
        }
        last_events = seq.events;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut report = AuditReport {
        schema: AUDIT_SCHEMA.into(),
        client_id_prefix: prefix.clone(),
        ledger_orders: fate.len() as u64,
        acknowledged: acked.len() as u64,
        uncertain: fate.values().filter(|(o, _)| o.uncertain()).count() as u64,
        uncertain_persisted: 0,
        refused: 0,
        persisted: orders.len() as u64,
        lost: Finding::default(),
        duplicated: Finding::default(),
        unexpected: Finding::default(),
        trade_violations: Finding::default(),
        status_mismatches: Finding::default(),
        sequence: seq,
        drained,
        waited_ms: started.elapsed().as_millis() as u64,
        passed: false,
    };
    for (id, (outcome, answered_status)) in &fate {
        let found = orders.get(id);
        match (outcome.acknowledged(), outcome.uncertain(), found) {
            (true, _, None) => report.lost.add(id.clone()),
            (true, _, Some(p)) => {
                if answered_status.as_deref() == Some("filled") && p.filled != p.quantity {
                    report.status_mismatches.add(format!(
                        "{id} answered filled, persisted {} ({}/{})",
                        p.status, p.filled, p.quantity
                    ));
                }
            }
            (false, true, Some(_)) => report.uncertain_persisted += 1,
            (false, true, None) => {}
            (false, false, found) => {
                report.refused += 1;
                if found.is_some() {
                    report
                        .unexpected
                        .add(format!("{id} ({})", outcome.as_str()));
                }
            }
        }
    }
    for (id, p) in &orders {
        if p.copies > 1 {
            report.duplicated.add(format!("{id} x{}", p.copies));
        }
        if !fate.contains_key(id) {
            report.unexpected.add(format!("{id} (not in ledger)"));
        }
    }
    let violations = sqlx::query(
        "WITH o AS (SELECT order_id, client_order_id, quantity, filled_quantity, cancelled_quantity, expired_quantity \
                    FROM orders WHERE starts_with(client_order_id, $1)), \
              t AS (SELECT order_id, sum(q) AS traded FROM ( \
                      SELECT maker_order_id AS order_id, quantity AS q FROM trades \
                      UNION ALL SELECT taker_order_id, quantity FROM trades) x \
                    WHERE order_id IN (SELECT order_id FROM o) GROUP BY order_id) \
         SELECT o.client_order_id, o.quantity, o.filled_quantity, coalesce(t.traded, 0)::bigint AS traded, \
                o.cancelled_quantity, o.expired_quantity \
         FROM o LEFT JOIN t USING (order_id) \
         WHERE o.filled_quantity <> coalesce(t.traded, 0) OR o.filled_quantity > o.quantity \
            OR o.filled_quantity + o.cancelled_quantity + o.expired_quantity > o.quantity",
    )
    .bind(format!("{prefix}-"))
    .fetch_all(&pool)
    .await
    .context("checking trade conservation")?;
    for r in violations {
        report.trade_violations.add(format!(
            "{}: quantity {} filled {} traded {} cancelled {} expired {}",
            r.try_get::<String, _>("client_order_id")?,
            r.try_get::<i64, _>("quantity")?,
            r.try_get::<i64, _>("filled_quantity")?,
            r.try_get::<i64, _>("traded")?,
            r.try_get::<i64, _>("cancelled_quantity")?,
            r.try_get::<i64, _>("expired_quantity")?,
        ));
    }
    let self_trades: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM trades WHERE maker_order_id = taker_order_id OR quantity <= 0",
    )
    .fetch_one(&pool)
    .await
    .context("checking trades")?;
    if self_trades > 0 {
        report.trade_violations.count += self_trades as u64;
        report.trade_violations.sample.push(format!(
            "{self_trades} trades with itself or without quantity"
        ));
    }
    report.passed = report.drained
        && report.lost.count == 0
        && report.duplicated.count == 0
        && report.unexpected.count == 0
        && report.trade_violations.count == 0
        && report.status_mismatches.count == 0
        && report.sequence.gaps == 0
        && (report.sequence.events == 0 || report.sequence.min_seq == 1);
    pool.close().await;
    Ok(report)
}
