//! The OpenAPI description: it parses, it is OpenAPI 3.0, it documents every route the router
//! serves (and nothing it does not), and every documented operation exists.

use crate::support::{closed_port, config, open};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use order_gateway::api::{OPENAPI_JSON, served_routes};
use order_gateway::app;
use serde_json::Value;
use std::collections::BTreeSet;
use tower::ServiceExt;

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().expect("path item") {
            if method != "parameters" {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn openapi_lists_every_served_route() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json parses");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let served: BTreeSet<(String, String)> = served_routes().into_iter().collect();
    assert_eq!(documented(&doc), served, "documented vs served routes");

    // Every operation documents its responses, errors use the shared schema, and every
    // $ref resolves.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}: responses"));
            for (code, r) in responses {
                if code.starts_with('4') || code.starts_with('5') {
                    let schema = &r["content"]["application/json"]["schema"];
                    assert!(
                        schema.is_object(),
                        "{method} {path} {code}: JSON error schema"
                    );
                }
            }
        }
    }
    let text = OPENAPI_JSON;
    for part in text.split("\"$ref\": \"#/").skip(1) {
        let pointer = format!("/{}", &part[..part.find('"').unwrap()]);
        assert!(doc.pointer(&pointer).is_some(), "dangling $ref {pointer}");
    }

    // It is served, and every documented operation is routed (not 404/405).
    let dir = tempfile::tempdir().unwrap();
    let app = app(open(config(dir.path(), closed_port(), closed_port())));
    let resp = app
        .clone()
        .oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let served_doc: Value = serde_json::from_slice(
        &axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served_doc, doc);
    for (method, path) in documented(&doc) {
        let uri = path.replace("{order_id}", "1").replace("{symbol}", "AAPL");
        let resp = app
            .clone()
            .oneshot(
                Request::builder()
                    .method(method.as_str())
                    .uri(&uri)
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let not_routed = status == StatusCode::METHOD_NOT_ALLOWED
            || (status == StatusCode::NOT_FOUND
                && String::from_utf8_lossy(&body).contains("not_found"));
        assert!(
            !not_routed,
            "{method} {uri} is documented but not routed ({status})"
        );
    }
}
