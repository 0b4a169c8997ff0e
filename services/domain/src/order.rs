//! Orders and the commands the matching engine accepts.

use crate::error::{ErrorCode, ValidationError};
use crate::ids::{Account, ClientOrderId, OrderId};
use crate::price::{Catalog, Price, Symbol};
use serde::{Deserialize, Serialize};

/// Buy or sell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

/// Limit orders carry a price; market orders take whatever the book offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderType {
    Limit,
    Market,
}

impl OrderType {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderType::Limit => "limit",
            OrderType::Market => "market",
        }
    }
}

/// How long the unfilled part of an order lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeInForce {
    /// Good till cancelled: the remainder rests in the book.
    Gtc,
    /// Immediate or cancel: fill what can be filled now, expire the rest.
    Ioc,
    /// Fill or kill: fill all of it now, or change nothing and expire.
    Fok,
}

impl TimeInForce {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeInForce::Gtc => "gtc",
            TimeInForce::Ioc => "ioc",
            TimeInForce::Fok => "fok",
        }
    }
}

/// A number of shares; positive and a whole number of lots once validated.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Quantity(pub u64);

/// Largest quantity accepted in one order: keeps price × quantity far from overflow.
pub const MAX_QUANTITY: u64 = 1_000_000_000;

/// A new order as a client sent it, each field still raw so that every problem can be reported
/// against its field. The gateway fills this from JSON (reporting wrong JSON types itself);
/// [`NewOrderRequest::validate`] turns it into a [`NewOrder`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrderRequest {
    pub client_order_id: Option<String>,
    pub account: Option<String>,
    pub symbol: Option<String>,
    pub side: Option<String>,
    #[serde(rename = "type")]
    pub order_type: Option<String>,
    pub price: Option<String>,
    pub quantity: Option<i64>,
    pub time_in_force: Option<String>,
}

fn required<'a>(field: &str, v: &'a Option<String>) -> Result<&'a str, ValidationError> {
    v.as_deref().ok_or_else(|| {
        ValidationError::new(field, ErrorCode::Missing, format!("{field} is required"))
    })
}

fn one_of<T: Copy>(field: &str, s: &str, options: &[(&str, T)]) -> Result<T, ValidationError> {
    options
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            ValidationError::new(
                field,
                ErrorCode::Malformed,
                format!("{field} {s:?} must be one of {}", names.join(", ")),
            )
        })
}

impl NewOrderRequest {
    /// Validates every field, in wire order, and returns the first problem found.
    ///
    /// Rules: `client_order_id`, `symbol`, `side`, `type` and `quantity` are required; the
    /// symbol must be listed; a limit order needs a `price` on the tick grid, a market order
    /// must not have one; `quantity` is positive, at most [`MAX_QUANTITY`] and a whole number of
    /// lots; `time_in_force` defaults to `gtc` for limit and `ioc` for market orders, and a
    /// market order cannot be `gtc`.
    pub fn validate(
        &self,
        catalog: &Catalog,
        order_id: OrderId,
    ) -> Result<NewOrder, ValidationError> {
        let client_order_id = ClientOrderId::parse(
            "client_order_id",
            required("client_order_id", &self.client_order_id)?,
        )?;
        let account = match &self.account {
            Some(a) => Some(Account::parse("account", a)?),
            None => None,
        };
        let symbol_text = required("symbol", &self.symbol)?;
        Symbol::parse("symbol", symbol_text)?;
        let spec = catalog.get("symbol", symbol_text)?;
        let side = one_of(
            "side",
            required("side", &self.side)?,
            &[("buy", Side::Buy), ("sell", Side::Sell)],
        )?;
        let order_type = one_of(
            "type",
            required("type", &self.order_type)?,
            &[("limit", OrderType::Limit), ("market", OrderType::Market)],
        )?;
        let price = match (order_type, &self.price) {
            (OrderType::Limit, Some(p)) => Some(spec.parse_price("price", p)?),
            (OrderType::Limit, None) => {
                return Err(ValidationError::new(
                    "price",
                    ErrorCode::Missing,
                    "price is required for limit orders",
                ));
            }
            (OrderType::Market, Some(_)) => {
                return Err(ValidationError::new(
                    "price",
                    ErrorCode::Conflict,
                    "market orders take no price; omit it or use type \"limit\"",
                ));
            }
            (OrderType::Market, None) => None,
        };
        let quantity = match self.quantity {
            None => {
                return Err(ValidationError::new(
                    "quantity",
                    ErrorCode::Missing,
                    "quantity is required",
                ));
            }
            Some(q) if q <= 0 => {
                return Err(ValidationError::new(
                    "quantity",
                    ErrorCode::OutOfRange,
                    format!("quantity {q} must be greater than zero"),
                ));
            }
            Some(q) if q as u64 > MAX_QUANTITY => {
                return Err(ValidationError::new(
                    "quantity",
                    ErrorCode::OutOfRange,
                    format!("quantity {q} exceeds the maximum of {MAX_QUANTITY}"),
                ));
            }
            Some(q) if !(q as u64).is_multiple_of(spec.lot_size) => {
                return Err(ValidationError::new(
                    "quantity",
                    ErrorCode::OffLotGrid,
                    format!(
                        "quantity {q} is not a multiple of {}'s lot size {}",
                        spec.symbol, spec.lot_size
                    ),
                ));
            }
            Some(q) => Quantity(q as u64),
        };
        let time_in_force = match &self.time_in_force {
            None if order_type == OrderType::Market => TimeInForce::Ioc,
            None => TimeInForce::Gtc,
            Some(t) => one_of(
                "time_in_force",
                t,
                &[
                    ("gtc", TimeInForce::Gtc),
                    ("ioc", TimeInForce::Ioc),
                    ("fok", TimeInForce::Fok),
                ],
            )?,
        };
        if order_type == OrderType::Market && time_in_force == TimeInForce::Gtc {
            return Err(ValidationError::new(
                "time_in_force",
                ErrorCode::Conflict,
                "market orders cannot rest: use \"ioc\" or \"fok\"",
            ));
        }
        Ok(NewOrder {
            order_id,
            client_order_id,
            account,
            symbol: spec.symbol.clone(),
            side,
            order_type,
            price,
            quantity,
            time_in_force,
        })
    }
}

/// A validated new order, as the engine receives, journals and publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    pub order_id: OrderId,
    pub client_order_id: ClientOrderId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<Account>,
    pub symbol: Symbol,
    pub side: Side,
    #[serde(rename = "type")]
    pub order_type: OrderType,
    /// Ticks; present exactly when `order_type` is limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    pub quantity: Quantity,
    pub time_in_force: TimeInForce,
}

/// A request to cancel the resting remainder of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order_id: OrderId,
}

/// What the engine is asked to do; journaled before it is answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    NewOrder(NewOrder),
    Cancel(CancelOrder),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NewOrderRequest {
        NewOrderRequest {
            client_order_id: Some("c-1".into()),
            account: Some("acct-1".into()),
            symbol: Some("AAPL".into()),
            side: Some("buy".into()),
            order_type: Some("limit".into()),
            price: Some("101.25".into()),
            quantity: Some(10),
            time_in_force: Some("gtc".into()),
        }
    }

    #[test]
    fn a_good_order_validates() {
        let o = base().validate(&Catalog::lab(), OrderId(7)).unwrap();
        assert_eq!(o.price, Some(Price(10125)));
        assert_eq!(o.quantity, Quantity(10));
        assert_eq!(o.order_id, OrderId(7));
        let mut m = base();
        m.order_type = Some("market".into());
        m.price = None;
        m.time_in_force = None;
        let o = m.validate(&Catalog::lab(), OrderId(8)).unwrap();
        assert_eq!(o.time_in_force, TimeInForce::Ioc);
    }

    #[test]
    fn every_bad_field_is_named() {
        type Edit = fn(&mut NewOrderRequest);
        let table: &[(&str, Edit, &str, ErrorCode)] = &[
            (
                "no client id",
                |r| r.client_order_id = None,
                "client_order_id",
                ErrorCode::Missing,
            ),
            (
                "bad client id",
                |r| r.client_order_id = Some("a b".into()),
                "client_order_id",
                ErrorCode::Malformed,
            ),
            (
                "bad account",
                |r| r.account = Some("".into()),
                "account",
                ErrorCode::Missing,
            ),
            (
                "no symbol",
                |r| r.symbol = None,
                "symbol",
                ErrorCode::Missing,
            ),
            (
                "unknown symbol",
                |r| r.symbol = Some("ZZZZ".into()),
                "symbol",
                ErrorCode::UnknownSymbol,
            ),
            (
                "lowercase symbol",
                |r| r.symbol = Some("aapl".into()),
                "symbol",
                ErrorCode::Malformed,
            ),
            (
                "bad side",
                |r| r.side = Some("hold".into()),
                "side",
                ErrorCode::Malformed,
            ),
            ("no side", |r| r.side = None, "side", ErrorCode::Missing),
            (
                "bad type",
                |r| r.order_type = Some("stop".into()),
                "type",
                ErrorCode::Malformed,
            ),
            ("no price", |r| r.price = None, "price", ErrorCode::Missing),
            (
                "off grid",
                |r| r.price = Some("101.255".into()),
                "price",
                ErrorCode::OffTickGrid,
            ),
            (
                "negative price",
                |r| r.price = Some("-5".into()),
                "price",
                ErrorCode::OutOfRange,
            ),
            (
                "market with price",
                |r| r.order_type = Some("market".into()),
                "price",
                ErrorCode::Conflict,
            ),
            (
                "zero qty",
                |r| r.quantity = Some(0),
                "quantity",
                ErrorCode::OutOfRange,
            ),
            (
                "negative qty",
                |r| r.quantity = Some(-3),
                "quantity",
                ErrorCode::OutOfRange,
            ),
            (
                "huge qty",
                |r| r.quantity = Some(i64::MAX),
                "quantity",
                ErrorCode::OutOfRange,
            ),
            (
                "no qty",
                |r| r.quantity = None,
                "quantity",
                ErrorCode::Missing,
            ),
            (
                "bad tif",
                |r| r.time_in_force = Some("day".into()),
                "time_in_force",
                ErrorCode::Malformed,
            ),
            (
                "market gtc",
                |r| {
                    r.order_type = Some("market".into());
                    r.price = None;
                },
                "time_in_force",
                ErrorCode::Conflict,
            ),
            (
                "off lot",
                |r| {
                    r.symbol = Some("IDX".into());
                    r.price = Some("10.05".into());
                    r.quantity = Some(15);
                },
                "quantity",
                ErrorCode::OffLotGrid,
            ),
        ];
        for (name, edit, field, code) in table {
            let mut r = base();
            edit(&mut r);
            let e = r.validate(&Catalog::lab(), OrderId(1)).unwrap_err();
            assert_eq!((e.field.as_str(), e.code), (*field, *code), "{name}: {e}");
        }
    }
}
