//! Bad input, as a table: every malformed request is answered 4xx with the JSON error shape,
//! `error.field` naming the field at fault and the right `error.code`; none is a 5xx. These go
//! through `app().oneshot` (no socket) and never reach the engine (which is not running).

use crate::support::{closed_port, config, open};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use order_gateway::app;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A valid order with `edit` applied (a field set to a value, or removed with `None`).
fn with(field: &str, value: Option<Value>) -> Vec<u8> {
    let mut o = crate::support::order("c-1");
    let m = o.as_object_mut().unwrap();
    match value {
        Some(v) => {
            m.insert(field.to_owned(), v);
        }
        None => {
            m.remove(field);
        }
    }
    serde_json::to_vec(&o).unwrap()
}

struct Case {
    name: &'static str,
    method: Method,
    uri: &'static str,
    body: Vec<u8>,
    /// Send a `Content-Length` header (as real clients do for a known-size body).
    content_length: bool,
    status: StatusCode,
    field: Option<&'static str>,
    code: &'static str,
}

fn post(
    name: &'static str,
    body: Vec<u8>,
    status: u16,
    field: &'static str,
    code: &'static str,
) -> Case {
    Case {
        name,
        method: Method::POST,
        uri: "/v1/orders",
        body,
        content_length: true,
        status: StatusCode::from_u16(status).unwrap(),
        field: Some(field),
        code,
    }
}

fn call(
    name: &'static str,
    method: Method,
    uri: &'static str,
    status: u16,
    field: Option<&'static str>,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        uri,
        body: vec![],
        content_length: false,
        status: StatusCode::from_u16(status).unwrap(),
        field,
        code,
    }
}

fn cases() -> Vec<Case> {
    let big = {
        let mut o = crate::support::order("c-1");
        o["account"] = Value::String("x".repeat(70 * 1024));
        serde_json::to_vec(&o).unwrap()
    };
    let mut cases = vec![
        post("not JSON", b"client_order_id=c-1".to_vec(), 400, "body", "malformed"),
        post("empty body", vec![], 400, "body", "malformed"),
        post("truncated JSON", br#"{"client_order_id": "c-1""#.to_vec(), 400, "body", "malformed"),
        post("array body", br#"[{"client_order_id": "c-1"}]"#.to_vec(), 400, "body", "malformed"),
        post("string body", br#""order""#.to_vec(), 400, "body", "malformed"),
        post("null body", b"null".to_vec(), 400, "body", "malformed"),
        post("deeply nested", format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), 400, "body", "malformed"),
        post("oversized body", big.clone(), 413, "body", "too_large"),
        Case {
            content_length: false,
            ..post("oversized body, no length", big, 413, "body", "too_large")
        },
        post("unknown field", with("colour", Some(json!("red"))), 422, "colour", "unknown_field"),
        post("unknown symbol", with("symbol", Some(json!("ZZZZ"))), 422, "symbol", "unknown_symbol"),
        post("lowercase symbol", with("symbol", Some(json!("aapl"))), 422, "symbol", "malformed"),
        post("off-grid price", with("price", Some(json!("101.255"))), 422, "price", "off_tick_grid"),
        post("negative price", with("price", Some(json!("-1.00"))), 422, "price", "out_of_range"),
        post("price not a decimal", with("price", Some(json!("1e3"))), 422, "price", "malformed"),
        post("zero quantity", with("quantity", Some(json!(0))), 422, "quantity", "out_of_range"),
        post("negative quantity", with("quantity", Some(json!(-5))), 422, "quantity", "out_of_range"),
        post("fractional quantity", with("quantity", Some(json!(10.5))), 422, "quantity", "malformed"),
        post("float quantity", with("quantity", Some(json!(10.0))), 422, "quantity", "malformed"),
        post("huge quantity", br#"{"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"limit","price":"1","quantity":18446744073709551615}"#.to_vec(), 422, "quantity", "out_of_range"),
        post("exponent quantity", br#"{"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"limit","price":"1","quantity":1e30}"#.to_vec(), 422, "quantity", "malformed"),
        post("bad side", with("side", Some(json!("hold"))), 422, "side", "malformed"),
        post("bad type", with("type", Some(json!("stop"))), 422, "type", "malformed"),
        post("bad time_in_force", with("time_in_force", Some(json!("day"))), 422, "time_in_force", "malformed"),
        post("bad client_order_id", with("client_order_id", Some(json!("a b"))), 422, "client_order_id", "malformed"),
        post("empty account", with("account", Some(json!(""))), 422, "account", "missing"),
        post("market order with price", with("type", Some(json!("market"))), 422, "price", "conflict"),
        post("off lot grid", br#"{"client_order_id":"c-1","symbol":"IDX","side":"buy","type":"limit","price":"10.05","quantity":15}"#.to_vec(), 422, "quantity", "off_lot_grid"),
        post("market gtc", br#"{"client_order_id":"c-1","symbol":"AAPL","side":"buy","type":"market","quantity":5,"time_in_force":"gtc"}"#.to_vec(), 422, "time_in_force", "conflict"),
        post("limit without price", with("price", None), 422, "price", "missing"),
        post("null price on a limit order", with("price", Some(Value::Null)), 422, "price", "missing"),
        call("cancel with a non-numeric id", Method::DELETE, "/v1/orders/abc", 400, Some("order_id"), "malformed"),
        call("cancel with a negative id", Method::DELETE, "/v1/orders/-1", 400, Some("order_id"), "malformed"),
        call("cancel with an id beyond u64", Method::DELETE, "/v1/orders/99999999999999999999999", 400, Some("order_id"), "malformed"),
        call("status with a bad id", Method::GET, "/v1/orders/12x", 400, Some("order_id"), "malformed"),
        call("book of an unknown symbol", Method::GET, "/v1/book/ZZZZ", 422, Some("symbol"), "unknown_symbol"),
        call("book of a malformed symbol", Method::GET, "/v1/book/a%20b", 422, Some("symbol"), "malformed"),
        call("book with depth 0", Method::GET, "/v1/book/AAPL?depth=0", 422, Some("depth"), "out_of_range"),
        call("book with a bad depth", Method::GET, "/v1/book/AAPL?depth=ten", 422, Some("depth"), "malformed"),
        call("unknown route", Method::GET, "/v1/nothing", 404, None, "not_found"),
        call("wrong method", Method::PUT, "/v1/orders", 405, None, "method_not_allowed"),
    ];
    for field in ["client_order_id", "symbol", "side", "type", "quantity"] {
        cases.push(Case {
            name: "missing field",
            ..post("", with(field, None), 422, field, "missing")
        });
    }
    let wrong_types: &[(&'static str, Value)] = &[
        ("client_order_id", json!(5)),
        ("account", json!(true)),
        ("symbol", json!(["AAPL"])),
        ("side", json!({"buy": true})),
        ("type", json!(1)),
        ("price", json!(101.25)),
        ("quantity", json!("10")),
        ("time_in_force", json!(3)),
    ];
    for (field, v) in wrong_types {
        cases.push(Case {
            name: "wrong JSON type",
            ..post("", with(field, Some(v.clone())), 422, field, "malformed")
        });
    }
    cases
}

#[tokio::test]
async fn every_malformed_request_names_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let gw = open(config(dir.path(), closed_port(), closed_port()));
    let app = app(gw);
    let mut failures = Vec::new();
    for case in cases() {
        let mut req = Request::builder().method(case.method.clone()).uri(case.uri);
        if case.content_length {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, case.body.len());
        }
        // Without a Content-Length header kit's body-limit layer cannot refuse up front, so
        // the handler's own bounded read must.
        let body = Body::from(case.body.clone());
        let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let got = (
            status,
            json["error"]["field"].as_str().map(str::to_owned),
            json["error"]["code"].as_str().map(str::to_owned),
        );
        let want = (
            case.status,
            case.field.map(str::to_owned),
            Some(case.code.to_owned()),
        );
        assert!(
            !status.is_server_error(),
            "{}: 5xx for bad input",
            case.name
        );
        if got != want
            || ctype.as_deref() != Some("application/json")
            || json["error"]["message"].as_str().is_none_or(str::is_empty)
        {
            failures.push(format!(
                "{} ({} {}): want {want:?}, got {got:?} {ctype:?} {}",
                case.name,
                case.method,
                case.uri,
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
