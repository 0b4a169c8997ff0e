//! A realistic, seeded order flow: limit orders around a moving mid price with a spread so
//! that a good share of them trade, some market, IOC and FOK orders, and cancels of the
//! generator's own resting orders.
//!
//! The sequence of new orders is a pure function of the seed; which resting order a cancel
//! picks depends on what the exchange answered, so it is not.

use domain::{Catalog, SymbolSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// Shape of the flow.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub seed: u64,
    /// Symbols to trade (must be listed in the catalog).
    pub symbols: Vec<String>,
    /// Share of commands that cancel one of our resting orders (when we have one).
    pub cancel_share: f64,
    /// Number of distinct accounts orders are spread over.
    pub accounts: u32,
    /// Prefix of every client order id, so runs never collide with each other.
    pub client_id_prefix: String,
}

/// One command of the flow.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowCommand {
    /// `POST /v1/orders` with this body.
    New {
        client_order_id: String,
        symbol: String,
        body: Value,
    },
    /// `DELETE /v1/orders/{order_id}`.
    Cancel { order_id: u64 },
}

#[derive(Debug)]
struct SymbolState {
    spec: SymbolSpec,
    /// Mid price in ticks.
    mid: i64,
}

/// The generator.
#[derive(Debug)]
pub struct Flow {
    rng: ChaCha8Rng,
    symbols: Vec<SymbolState>,
    spec: FlowSpec,
    next: u64,
}

impl Flow {
    /// Checks every symbol against the catalog, naming any that is not listed.
    pub fn new(spec: FlowSpec, catalog: &Catalog) -> Result<Flow, String> {
        if spec.symbols.is_empty() {
            return Err("--symbols: at least one symbol is needed".into());
        }
        let mut symbols = Vec::new();
        for (i, s) in spec.symbols.iter().enumerate() {
            let found = catalog
                .get("symbols", s)
                .map_err(|e| format!("--symbols: {}", e.message))?;
            // Mid prices between 50 and 500 in the symbol's own ticks.
            let units_per_tick = found.tick_units as i64;
            let scale = 10i64.pow(u32::from(found.price_decimals));
            let mid_price_units = (100 + 50 * i as i64) * scale;
            symbols.push(SymbolState {
                spec: found.clone(),
                mid: mid_price_units / units_per_tick,
            });
        }
        Ok(Flow {
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            symbols,
            spec,
            next: 0,
        })
    }

    /// The next command; `resting` are order ids we believe still rest (for cancels).
    pub fn next(&mut self, resting: &mut Vec<u64>) -> FlowCommand {
        if !resting.is_empty() && self.rng.random_bool(self.spec.cancel_share) {
            let i = self.rng.random_range(0..resting.len());
            return FlowCommand::Cancel {
                order_id: resting.swap_remove(i),
            };
        }
        self.next += 1;
        let client_order_id = format!("{}-{}", self.spec.client_id_prefix, self.next);
        let si = self.rng.random_range(0..self.symbols.len());
        let account = format!("acct-{}", self.rng.random_range(1..=self.spec.accounts));
        let buy = self.rng.random_bool(0.5);
        let st = &mut self.symbols[si];
        if self.rng.random_ratio(1, 20) {
            st.mid = (st.mid + if self.rng.random_bool(0.5) { 1 } else { -1 }).max(10);
        }
        let lot = st.spec.lot_size as i64;
        let quantity = self.rng.random_range(1..=20i64) * lot;
        let kind: f64 = self.rng.random();
        let side = if buy { "buy" } else { "sell" };
        // Ticks away from the mid, on the order's own side; negative values cross the spread.
        let away = |rng: &mut ChaCha8Rng, lo: i64, hi: i64| rng.random_range(lo..=hi);
        let sign = if buy { -1 } else { 1 };
        let (order_type, tif, price_ticks) = if kind < 0.78 {
            (
                "limit",
                "gtc",
                Some(st.mid + sign * away(&mut self.rng, -3, 20)),
            )
        } else if kind < 0.88 {
            (
                "limit",
                "ioc",
                Some(st.mid + sign * away(&mut self.rng, -5, 2)),
            )
        } else if kind < 0.93 {
            (
                "limit",
                "fok",
                Some(st.mid + sign * away(&mut self.rng, -5, 1)),
            )
        } else if kind < 0.98 {
            ("market", "ioc", None)
        } else {
            ("market", "fok", None)
        };
        let mut body = json!({
            "client_order_id": client_order_id,
            "account": account,
            "symbol": st.spec.symbol.as_str(),
            "side": side,
            "type": order_type,
            "quantity": quantity,
            "time_in_force": tif,
        });
        if let Some(p) = price_ticks {
            body["price"] = Value::String(st.spec.format_price(domain::Price(p.max(1))));
        }
        FlowCommand::New {
            client_order_id,
            symbol: st.spec.symbol.as_str().to_owned(),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> FlowSpec {
        FlowSpec {
            seed,
            symbols: vec!["AAPL".into(), "IDX".into()],
            cancel_share: 0.1,
            accounts: 10,
            client_id_prefix: "t".into(),
        }
    }

    #[test]
    fn seeded_valid_and_varied() {
        let catalog = Catalog::lab();
        let mut a = Flow::new(spec(7), &catalog).unwrap();
        let mut b = Flow::new(spec(7), &catalog).unwrap();
        let mut types = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let (x, y) = (a.next(&mut vec![]), b.next(&mut vec![]));
            assert_eq!(x, y, "same seed, same flow");
            let FlowCommand::New { body, .. } = x else {
                panic!("no cancels without resting orders")
            };
            types.insert(format!("{}/{}", body["type"], body["time_in_force"]));
            // Every generated order passes the gateway's validation.
            let req = domain::NewOrderRequest {
                client_order_id: body["client_order_id"].as_str().map(Into::into),
                account: body["account"].as_str().map(Into::into),
                symbol: body["symbol"].as_str().map(Into::into),
                side: body["side"].as_str().map(Into::into),
                order_type: body["type"].as_str().map(Into::into),
                price: body["price"].as_str().map(Into::into),
                quantity: body["quantity"].as_i64(),
                time_in_force: body["time_in_force"].as_str().map(Into::into),
            };
            req.validate(&catalog, domain::OrderId(1)).unwrap();
        }
        assert_eq!(types.len(), 5, "{types:?}");
        let mut resting = vec![1, 2, 3];
        let cancels = (0..200)
            .filter(|_| matches!(a.next(&mut resting), FlowCommand::Cancel { .. }))
            .count();
        assert!(cancels > 0 && resting.len() < 3);
        assert!(
            Flow::new(
                FlowSpec {
                    symbols: vec!["NOPE".into()],
                    ..spec(1)
                },
                &catalog
            )
            .is_err()
        );
    }
}
