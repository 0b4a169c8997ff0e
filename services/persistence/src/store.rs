//! Everything that speaks SQL: the pool, migrations, the batch transaction and the queries of
//! the read API. Only this module (and so only this service) touches PostgreSQL.
//!
//! A batch is one transaction of a handful of set-based statements, whatever its size:
//! `INSERT .. SELECT FROM UNNEST(arrays) .. ON CONFLICT (seq) DO NOTHING RETURNING seq` for the
//! events, one `SELECT` of the orders they touch, one upsert of the changed orders, one insert
//! of the trades, one of the poison messages, one update of the progress row. Only events the
//! first statement returned (newly inserted) are applied to orders and trades, which is what
//! makes a redelivery a no-op.

use crate::apply::{self, Anomaly, OrderRow};
use crate::config::DatabaseConfig;
use crate::error::StoreError;
use crate::seq::{Gap, SeqTracker};
use domain::{Catalog, Event, EventKind};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Migrations embedded at compile time from `services/persistence/migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Poison bodies are stored up to this many bytes (`body_bytes` keeps the real length).
pub const POISON_BODY_MAX_BYTES: usize = 1 << 20;

/// A pool that connects lazily (the service starts before PostgreSQL) and pings every
/// connection before handing it out, so a connection broken by a database restart is
/// discarded instead of failing the next batch.
pub fn pool(cfg: &DatabaseConfig) -> Result<PgPool, kit::config::ConfigError> {
    let options = cfg.connect_options()?;
    Ok(PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms))
        .test_before_acquire(true)
        .idle_timeout(Duration::from_secs(60))
        .connect_lazy_with(options))
}

/// Applies pending migrations (under the migrator's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Rebuilds the sequence tracker from the progress row and the runs of seqs above it.
pub async fn load_tracker(pool: &PgPool) -> Result<SeqTracker, StoreError> {
    let contiguous: i64 =
        sqlx::query_scalar("SELECT contiguous_seq FROM persistence_progress WHERE id = 1")
            .fetch_optional(pool)
            .await?
            .unwrap_or(0);
    let runs: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT min(seq), max(seq) FROM ( \
             SELECT seq, seq - row_number() OVER (ORDER BY seq) AS grp \
             FROM events WHERE seq > $1) r \
         GROUP BY grp ORDER BY 1",
    )
    .bind(contiguous)
    .fetch_all(pool)
    .await?;
    let runs: Vec<(u64, u64)> = runs
        .into_iter()
        .map(|(a, b)| (a.max(0) as u64, b.max(0) as u64))
        .collect();
    Ok(SeqTracker::new(contiguous.max(0) as u64, &runs))
}

/// One poison message to store.
#[derive(Debug, Clone)]
pub struct PoisonRow<'a> {
    pub body: &'a [u8],
    pub reason: &'static str,
    pub error: String,
    pub redelivered: bool,
}

/// What a committed batch did.
#[derive(Debug)]
pub struct WriteOutcome {
    /// Events in the input (after removing seqs repeated within the batch).
    pub events_in: usize,
    /// Seqs inserted by this batch, ascending.
    pub new_seqs: Vec<u64>,
    pub orders_written: usize,
    pub trades_written: usize,
    /// Poison rows stored, by reason.
    pub poison_written: Vec<&'static str>,
    pub anomalies: Vec<Anomaly>,
    pub gaps: Vec<Gap>,
    /// The tracker after this batch (the caller's copy is replaced only after commit).
    pub tracker: SeqTracker,
}

impl WriteOutcome {
    /// Events that were already stored (redeliveries).
    pub fn duplicates(&self) -> usize {
        self.events_in - self.new_seqs.len()
    }
}

fn no_nul(s: &str) -> String {
    s.replace('\0', "\u{fffd}")
}

/// Writes one batch in one transaction. `events` must be sorted by seq without repeats.
pub async fn write_batch(
    conn: &mut PgConnection,
    catalog: &Catalog,
    events: &[&Event],
    poison: &[PoisonRow<'_>],
    tracker: &SeqTracker,
) -> Result<WriteOutcome, StoreError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;

    // 1. Events: insert, learn which were new.
    let mut new_seqs: Vec<u64> = Vec::new();
    if !events.is_empty() {
        let mut seqs = Vec::with_capacity(events.len());
        let mut kinds = Vec::with_capacity(events.len());
        let mut symbols: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut order_ids: Vec<Option<i64>> = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        for e in events {
            seqs.push(e.seq as i64);
            kinds.push(e.kind.name());
            let (symbol, order_id) = match &e.kind {
                EventKind::Accepted { order } => {
                    (Some(order.symbol.as_str()), Some(order.order_id.0))
                }
                EventKind::Rejected { order_id, .. } => (None, Some(order_id.0)),
                EventKind::Trade {
                    symbol,
                    taker_order_id,
                    ..
                } => (Some(symbol.as_str()), Some(taker_order_id.0)),
                EventKind::Cancelled {
                    symbol, order_id, ..
                }
                | EventKind::Expired {
                    symbol, order_id, ..
                } => (Some(symbol.as_str()), Some(order_id.0)),
            };
            symbols.push(symbol.map(str::to_owned));
            order_ids.push(order_id.map(|o| o as i64));
            payloads.push(
                serde_json::to_string(e)
                    .map_err(|err| StoreError::Corrupt(format!("serializing event: {err}")))?,
            );
        }
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO events (seq, type, symbol, order_id, payload) \
             SELECT u.seq, u.kind, u.symbol, u.order_id, u.payload::jsonb \
             FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[]) \
                  AS u(seq, kind, symbol, order_id, payload) \
             ON CONFLICT (seq) DO NOTHING \
             RETURNING seq",
        )
        .bind(&seqs)
        .bind(&kinds)
        .bind(&symbols)
        .bind(&order_ids)
        .bind(&payloads)
        .fetch_all(&mut *tx)
        .await?;
        new_seqs = inserted.into_iter().map(|s| s as u64).collect();
        new_seqs.sort_unstable();
    }

    // 2. Orders and trades, from the new events only.
    let new_set: HashSet<u64> = new_seqs.iter().copied().collect();
    let new_events: Vec<Event> = events
        .iter()
        .filter(|e| new_set.contains(&e.seq))
        .map(|e| (*e).clone())
        .collect();
    let mut orders_written = 0;
    let mut trades_written = 0;
    let mut anomalies = Vec::new();
    if !new_events.is_empty() {
        let ids = apply::referenced_orders(&new_events);
        let existing = load_orders(&mut tx, &ids).await?;
        let plan = apply::plan(catalog, &new_events, existing);
        orders_written = upsert_orders(&mut tx, &plan.orders).await?;
        trades_written = insert_trades(&mut tx, &plan.trades).await?;
        anomalies = plan.anomalies;
    }

    // 3. Poison messages.
    let poison_written = insert_poison(&mut tx, poison).await?;

    // 4. Progress.
    let mut after = tracker.clone();
    let gaps = after.record(&new_seqs);
    if after.contiguous() != tracker.contiguous() {
        sqlx::query("UPDATE persistence_progress SET contiguous_seq = $1 WHERE id = 1")
            .bind(after.contiguous() as i64)
            .execute(&mut *tx)
            .await?;
    }

    tx.commit().await?;
    Ok(WriteOutcome {
        events_in: events.len(),
        new_seqs,
        orders_written,
        trades_written,
        poison_written,
        anomalies,
        gaps,
        tracker: after,
    })
}

/// The columns of `orders` as [`order_from_row`] reads them (a macro so that queries stay
/// `&'static str`).
macro_rules! order_columns {
    () => {
        "order_id, client_order_id, account, symbol, side, type, price_ticks, \
         price::text AS price, quantity, time_in_force, status, filled_quantity, \
         cancelled_quantity, expired_quantity, reject_reason, expire_reason, accepted_seq, \
         last_seq"
    };
}

fn order_from_row(row: &PgRow) -> Result<OrderRow, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(OrderRow {
        order_id: row.try_get("order_id")?,
        client_order_id: row.try_get("client_order_id")?,
        account: row.try_get("account")?,
        symbol: row.try_get("symbol")?,
        side: row.try_get("side")?,
        order_type: row.try_get("type")?,
        price_ticks: row.try_get("price_ticks")?,
        price: row.try_get("price")?,
        quantity: row.try_get("quantity")?,
        time_in_force: row.try_get("time_in_force")?,
        status: apply::parse_status(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown order status {status:?}")))?,
        filled_quantity: row.try_get("filled_quantity")?,
        cancelled_quantity: row.try_get("cancelled_quantity")?,
        expired_quantity: row.try_get("expired_quantity")?,
        reject_reason: row.try_get("reject_reason")?,
        expire_reason: row.try_get("expire_reason")?,
        accepted_seq: row.try_get("accepted_seq")?,
        last_seq: row.try_get("last_seq")?,
    })
}

async fn load_orders(
    conn: &mut PgConnection,
    ids: &[i64],
) -> Result<HashMap<i64, OrderRow>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    // Not a prepared statement: PostgreSQL then plans it for these ids and the table as it is
    // now. Prepared, it switches to a generic plan after five executions; on a fresh database
    // (no statistics until autovacuum's first ANALYZE, a minute or more in) that plan is made
    // while `orders` is tiny — a sequential scan — and kept: every batch then read the whole,
    // growing table, and PostgreSQL spent 3× the CPU under load (docs/persistence.md).
    let rows = sqlx::query(concat!(
        "SELECT ",
        order_columns!(),
        " FROM orders WHERE order_id = ANY($1)"
    ))
    .persistent(false)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| order_from_row(r).map(|o| (o.order_id, o)))
        .collect()
}

async fn upsert_orders(conn: &mut PgConnection, orders: &[OrderRow]) -> Result<usize, StoreError> {
    if orders.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&OrderRow) -> Option<String>| orders.iter().map(f).collect::<Vec<_>>();
    let int = |f: fn(&OrderRow) -> Option<i64>| orders.iter().map(f).collect::<Vec<_>>();
    let result = sqlx::query(
        "INSERT INTO orders (order_id, client_order_id, account, symbol, side, type, price_ticks, \
             price, quantity, time_in_force, status, filled_quantity, cancelled_quantity, \
             expired_quantity, reject_reason, expire_reason, accepted_seq, last_seq) \
         SELECT u.order_id, u.client_order_id, u.account, u.symbol, u.side, u.kind, \
             u.price_ticks, u.price::numeric, u.quantity, u.tif, u.status, u.filled, \
             u.cancelled, u.expired, u.reject_reason, u.expire_reason, u.accepted_seq, \
             u.last_seq \
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
             $7::bigint[], $8::text[], $9::bigint[], $10::text[], $11::text[], $12::bigint[], \
             $13::bigint[], $14::bigint[], $15::text[], $16::text[], $17::bigint[], \
             $18::bigint[]) \
             AS u(order_id, client_order_id, account, symbol, side, kind, price_ticks, price, \
                  quantity, tif, status, filled, cancelled, expired, reject_reason, \
                  expire_reason, accepted_seq, last_seq) \
         ON CONFLICT (order_id) DO UPDATE SET \
             status = EXCLUDED.status, \
             filled_quantity = EXCLUDED.filled_quantity, \
             cancelled_quantity = EXCLUDED.cancelled_quantity, \
             expired_quantity = EXCLUDED.expired_quantity, \
             reject_reason = EXCLUDED.reject_reason, \
             expire_reason = EXCLUDED.expire_reason, \
             last_seq = EXCLUDED.last_seq, \
             updated_at = now()",
    )
    .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .map(|o| o.client_order_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(col(|o| o.account.clone()))
    .bind(col(|o| o.symbol.clone()))
    .bind(col(|o| o.side.clone()))
    .bind(col(|o| o.order_type.clone()))
    .bind(int(|o| o.price_ticks))
    .bind(col(|o| o.price.clone()))
    .bind(orders.iter().map(|o| o.quantity).collect::<Vec<_>>())
    .bind(col(|o| o.time_in_force.clone()))
    .bind(orders.iter().map(|o| o.status.as_str()).collect::<Vec<_>>())
    .bind(int(|o| Some(o.filled_quantity)))
    .bind(int(|o| Some(o.cancelled_quantity)))
    .bind(int(|o| Some(o.expired_quantity)))
    .bind(col(|o| o.reject_reason.clone()))
    .bind(col(|o| o.expire_reason.clone()))
    .bind(int(|o| o.accepted_seq))
    .bind(int(|o| Some(o.last_seq)))
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected() as usize)
}

async fn insert_trades(
    conn: &mut PgConnection,
    trades: &[apply::TradeRow],
) -> Result<usize, StoreError> {
    if trades.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "INSERT INTO trades (seq, symbol, maker_order_id, taker_order_id, taker_side, \
             price_ticks, price, quantity) \
         SELECT u.seq, u.symbol, u.maker, u.taker, u.side, u.ticks, u.price::numeric, u.qty \
         FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], \
             $6::bigint[], $7::text[], $8::bigint[]) \
             AS u(seq, symbol, maker, taker, side, ticks, price, qty) \
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(trades.iter().map(|t| t.seq).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.symbol.clone()).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.maker_order_id).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.taker_order_id).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.taker_side).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.price_ticks).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.price.clone()).collect::<Vec<_>>())
    .bind(trades.iter().map(|t| t.quantity).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected() as usize)
}

async fn insert_poison(
    conn: &mut PgConnection,
    poison: &[PoisonRow<'_>],
) -> Result<Vec<&'static str>, StoreError> {
    // The same body twice in one statement would hit its own ON CONFLICT row twice.
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let rows: Vec<&PoisonRow<'_>> = poison
        .iter()
        .filter(|p| seen.insert(&p.body[..p.body.len().min(POISON_BODY_MAX_BYTES)]))
        .collect();
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "INSERT INTO poison_messages (body_md5, body, body_bytes, reason, error, redelivered) \
         SELECT md5(u.body), u.body, u.len, u.reason, u.error, u.redelivered \
         FROM UNNEST($1::bytea[], $2::bigint[], $3::text[], $4::text[], $5::boolean[]) \
             AS u(body, len, reason, error, redelivered) \
         ON CONFLICT (body_md5) DO UPDATE SET \
             occurrences = poison_messages.occurrences + 1, last_seen_at = now()",
    )
    .bind(
        rows.iter()
            .map(|p| p.body[..p.body.len().min(POISON_BODY_MAX_BYTES)].to_vec())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|p| p.body.len() as i64).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.reason).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| no_nul(&p.error)).collect::<Vec<_>>())
    .bind(rows.iter().map(|p| p.redelivered).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    Ok(rows.iter().map(|p| p.reason).collect())
}

/// Cheap liveness probe of the database.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Read API queries.

/// `GET /v1/orders/..` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderView {
    pub order_id: i64,
    pub client_order_id: String,
    pub account: Option<String>,
    pub symbol: Option<String>,
    pub side: Option<String>,
    #[serde(rename = "type")]
    pub order_type: Option<String>,
    /// Decimal string, `null` for market and rejected orders.
    pub price: Option<String>,
    /// 0 for a rejected order.
    pub quantity: i64,
    pub time_in_force: Option<String>,
    pub status: &'static str,
    pub filled_quantity: i64,
    pub cancelled_quantity: i64,
    pub expired_quantity: i64,
    pub reject_reason: Option<String>,
    pub expire_reason: Option<String>,
    pub fills: Vec<FillView>,
}

/// One fill of an order, from that order's side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FillView {
    pub trade_seq: i64,
    pub price: Option<String>,
    pub quantity: i64,
    pub counterparty_order_id: i64,
    pub maker: bool,
}

/// One entry of `GET /v1/trades`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TradeView {
    pub seq: i64,
    pub symbol: String,
    pub maker_order_id: i64,
    pub taker_order_id: i64,
    pub taker_side: String,
    pub price: Option<String>,
    pub quantity: i64,
    /// RFC 3339, UTC, when the trade was persisted.
    pub created_at: String,
}

/// `GET /v1/stats` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsView {
    pub last_seq: i64,
    pub contiguous_seq: i64,
    pub events: i64,
    pub orders: i64,
    pub trades: i64,
    pub poison_messages: i64,
}

/// Looks an order up by the exchange's id or by the client's id (the first order with it).
pub enum OrderKey<'a> {
    Id(i64),
    ClientOrderId(&'a str),
}

pub async fn order(pool: &PgPool, key: OrderKey<'_>) -> Result<Option<OrderView>, StoreError> {
    let row = match key {
        OrderKey::Id(id) => {
            sqlx::query(concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE order_id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await?
        }
        OrderKey::ClientOrderId(c) => {
            sqlx::query(concat!(
                "SELECT ",
                order_columns!(),
                " FROM orders WHERE client_order_id = $1 ORDER BY order_id LIMIT 1"
            ))
            .bind(c)
            .fetch_optional(pool)
            .await?
        }
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let o = order_from_row(&row)?;
    let fills = fills(pool, o.order_id).await?;
    Ok(Some(OrderView {
        order_id: o.order_id,
        client_order_id: o.client_order_id,
        account: o.account,
        symbol: o.symbol,
        side: o.side,
        order_type: o.order_type,
        price: o.price,
        quantity: o.quantity,
        time_in_force: o.time_in_force,
        status: o.status.as_str(),
        filled_quantity: o.filled_quantity,
        cancelled_quantity: o.cancelled_quantity,
        expired_quantity: o.expired_quantity,
        reject_reason: o.reject_reason,
        expire_reason: o.expire_reason,
        fills,
    }))
}

async fn fills(pool: &PgPool, order_id: i64) -> Result<Vec<FillView>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, price::text AS price, quantity, maker_order_id, taker_order_id FROM trades \
         WHERE maker_order_id = $1 OR taker_order_id = $1 ORDER BY seq",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let maker: i64 = r.try_get("maker_order_id")?;
            let taker: i64 = r.try_get("taker_order_id")?;
            let is_maker = maker == order_id;
            Ok(FillView {
                trade_seq: r.try_get("seq")?,
                price: r.try_get("price")?,
                quantity: r.try_get("quantity")?,
                counterparty_order_id: if is_maker { taker } else { maker },
                maker: is_maker,
            })
        })
        .collect()
}

/// The newest `limit` trades of `symbol`, newest first.
pub async fn trades(pool: &PgPool, symbol: &str, limit: i64) -> Result<Vec<TradeView>, StoreError> {
    let rows = sqlx::query(
        "SELECT seq, symbol, maker_order_id, taker_order_id, taker_side, price::text AS price, \
             quantity, \
             to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
                 AS created_at \
         FROM trades WHERE symbol = $1 ORDER BY seq DESC LIMIT $2",
    )
    .bind(symbol)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TradeView {
                seq: r.try_get("seq")?,
                symbol: r.try_get("symbol")?,
                maker_order_id: r.try_get("maker_order_id")?,
                taker_order_id: r.try_get("taker_order_id")?,
                taker_side: r.try_get("taker_side")?,
                price: r.try_get("price")?,
                quantity: r.try_get("quantity")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect()
}

/// Counts and seqs, read in one statement (one snapshot).
pub async fn stats(pool: &PgPool) -> Result<StatsView, StoreError> {
    let row = sqlx::query(
        "SELECT COALESCE((SELECT max(seq) FROM events), 0) AS last_seq, \
             COALESCE((SELECT contiguous_seq FROM persistence_progress WHERE id = 1), 0) \
                 AS contiguous_seq, \
             (SELECT count(*) FROM events) AS events, \
             (SELECT count(*) FROM orders) AS orders, \
             (SELECT count(*) FROM trades) AS trades, \
             (SELECT count(*) FROM poison_messages) AS poison_messages",
    )
    .fetch_one(pool)
    .await?;
    Ok(StatsView {
        last_seq: row.try_get("last_seq")?,
        contiguous_seq: row.try_get("contiguous_seq")?,
        events: row.try_get("events")?,
        orders: row.try_get("orders")?,
        trades: row.try_get("trades")?,
        poison_messages: row.try_get("poison_messages")?,
    })
}
