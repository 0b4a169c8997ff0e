//! From raw request bytes to a validated [`NewOrder`], naming the field at fault at every step.
//!
//! The body is parsed by hand rather than with a derived `Deserialize`, so that each problem
//! gets its own answer: not JSON or not an object → 400 (`body`, `malformed`); a field of the
//! wrong JSON type → 422 naming it (`malformed`); a field the API does not define → 422 naming
//! it (`unknown_field`); then [`NewOrderRequest::validate`] checks values (missing fields,
//! unknown symbols, prices off the tick grid, quantities out of range, ...).
//!
//! JSON `null` counts as an absent field (so `"price": null` on a market order is fine).
//! `quantity` must be a JSON integer: `10.0` and `10.5` are malformed, `-3` and `0` are out of
//! range. Prices are decimal strings, never JSON numbers, so no float ever carries money.

use crate::error::AppError;
use domain::{Catalog, ErrorCode, NewOrder, NewOrderRequest, OrderId, ValidationError};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The fields of `POST /v1/orders`, in wire order.
pub const ORDER_FIELDS: &[&str] = &[
    "client_order_id",
    "account",
    "symbol",
    "side",
    "type",
    "price",
    "quantity",
    "time_in_force",
];

/// Parses and validates a `POST /v1/orders` body. The returned order carries
/// `OrderId(0)`: the gateway assigns the real id only once it knows the request is new.
pub fn new_order(body: &[u8], catalog: &Catalog) -> Result<NewOrder, AppError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| AppError::MalformedBody(format!("request body is not valid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(AppError::MalformedBody(format!(
            "request body must be a JSON object, not {}",
            json_type(&value)
        )));
    };
    let request = request_from_object(&object)?;
    Ok(request.validate(catalog, OrderId(0))?)
}

/// Splits a `POST /v1/orders/batch` body, `{"orders": [order, ...]}`, into its orders, each
/// left unparsed for [`new_order`] (so that each is validated, and answered, on its own).
/// Not JSON or not an object → 400; `orders` missing, not an array, empty or longer than
/// `max` → 422 naming `orders`; any other field → 422 naming it.
pub fn order_batch(body: &[u8], max: usize) -> Result<Vec<&RawValue>, AppError> {
    let object: std::collections::BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| {
            let what = if e.is_data() {
                "request body must be a JSON object"
            } else {
                "request body is not valid JSON"
            };
            AppError::MalformedBody(format!("{what}: {e}"))
        })?;
    if let Some(field) = object.keys().find(|k| k.as_str() != "orders") {
        return Err(AppError::UnknownField {
            field: field.clone(),
        });
    }
    let Some(&raw) = object.get("orders") else {
        return Err(AppError::Invalid(ValidationError::new(
            "orders",
            ErrorCode::Missing,
            format!("orders is required: an array of 1 to {max} orders"),
        )));
    };
    let orders: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(|_| {
        AppError::malformed_field("orders", "orders must be an array of order objects")
    })?;
    if orders.is_empty() || orders.len() > max {
        return Err(AppError::Invalid(ValidationError::new(
            "orders",
            ErrorCode::OutOfRange,
            format!("orders must hold 1 to {max} orders, not {}", orders.len()),
        )));
    }
    Ok(orders)
}

/// Maps each known field with its JSON type; refuses unknown fields.
fn request_from_object(object: &Map<String, Value>) -> Result<NewOrderRequest, AppError> {
    let string = |field: &str| -> Result<Option<String>, AppError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(AppError::malformed_field(
                field,
                format!("{field} must be a string, not {}", json_type(other)),
            )),
        }
    };
    let request = NewOrderRequest {
        client_order_id: string("client_order_id")?,
        account: string("account")?,
        symbol: string("symbol")?,
        side: string("side")?,
        order_type: string("type")?,
        price: match object.get("price") {
            Some(Value::Number(n)) => {
                return Err(AppError::malformed_field(
                    "price",
                    format!(
                        "price must be a decimal string such as \"101.25\", not the number {n}"
                    ),
                ));
            }
            _ => string("price")?,
        },
        quantity: quantity(object.get("quantity"))?,
        time_in_force: string("time_in_force")?,
    };
    if let Some(unknown) = object.keys().find(|k| !ORDER_FIELDS.contains(&k.as_str())) {
        return Err(AppError::UnknownField {
            field: unknown.clone(),
        });
    }
    Ok(request)
}

/// `quantity`: a JSON integer. Integers beyond `i64` are out of range (validation would refuse
/// them anyway); fractions and other types are malformed.
fn quantity(value: Option<&Value>) -> Result<Option<i64>, AppError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if n.is_u64() {
                Err(AppError::Invalid(ValidationError::new(
                    "quantity",
                    ErrorCode::OutOfRange,
                    format!("quantity {n} is too large"),
                )))
            } else {
                Err(AppError::malformed_field(
                    "quantity",
                    format!("quantity must be a whole number of shares, not {n}"),
                ))
            }
        }
        Some(other) => Err(AppError::malformed_field(
            "quantity",
            format!("quantity must be an integer, not {}", json_type(other)),
        )),
    }
}

/// Parses an order id from a path segment: a decimal `u64`, naming `order_id` if not.
pub fn order_id(segment: &str) -> Result<OrderId, AppError> {
    let ok =
        !segment.is_empty() && segment.len() <= 20 && segment.bytes().all(|b| b.is_ascii_digit());
    match segment.parse::<u64>() {
        Ok(id) if ok => Ok(OrderId(id)),
        _ => Err(AppError::BadParameter(ValidationError::new(
            "order_id",
            ErrorCode::Malformed,
            format!(
                "order_id {:?} must be the decimal order id the gateway returned",
                segment.chars().take(40).collect::<String>()
            ),
        ))),
    }
}

/// Largest `depth` of `GET /v1/book/{symbol}`.
pub const MAX_BOOK_DEPTH: u32 = 1_000;
/// `depth` when the query does not give one.
pub const DEFAULT_BOOK_DEPTH: u32 = 10;

/// Reads `depth` from a raw query string (`depth=5`); other parameters are ignored.
pub fn book_depth(query: Option<&str>) -> Result<u32, AppError> {
    let raw = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == "depth")
        .map(|(_, v)| v);
    let Some(raw) = raw else {
        return Ok(DEFAULT_BOOK_DEPTH);
    };
    let bad = |code, message: String| {
        Err(AppError::Invalid(ValidationError::new(
            "depth", code, message,
        )))
    };
    match raw.parse::<u64>() {
        Ok(d) if (1..=u64::from(MAX_BOOK_DEPTH)).contains(&d) => Ok(d as u32),
        Ok(d) => bad(
            ErrorCode::OutOfRange,
            format!("depth {d} must be between 1 and {MAX_BOOK_DEPTH}"),
        ),
        Err(_) => bad(
            ErrorCode::Malformed,
            format!(
                "depth {:?} must be a whole number",
                raw.chars().take(40).collect::<String>()
            ),
        ),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_body_parses() {
        let o = new_order(
            br#"{"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"limit","price":"101.25","quantity":10}"#,
            &Catalog::lab(),
        )
        .unwrap();
        assert_eq!(o.price, Some(domain::Price(10125)));
        assert_eq!(o.order_id, OrderId(0));
    }

    #[test]
    fn ids_and_depths() {
        assert_eq!(order_id("42").unwrap(), OrderId(42));
        for bad in ["", "x", "-1", "+1", "1.0", "99999999999999999999999"] {
            let e = order_id(bad).unwrap_err();
            assert_eq!(e.detail().field.as_deref(), Some("order_id"), "{bad}");
        }
        assert_eq!(book_depth(None).unwrap(), DEFAULT_BOOK_DEPTH);
        assert_eq!(book_depth(Some("x=1&depth=5")).unwrap(), 5);
        assert!(book_depth(Some("depth=0")).is_err());
        assert!(book_depth(Some("depth=abc")).is_err());
        assert!(book_depth(Some("depth")).is_err());
    }
}
