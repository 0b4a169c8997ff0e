//! A stand-in for the order gateway, for the generator's tests: axum on a free loopback port,
//! answering `POST /v1/orders` with 201 and `DELETE /v1/orders/{id}` with 200 after the delay
//! that route's closure returns for each request (`None`: never answers). `POST
//! /v1/orders/batch` asks the order closure once per order and answers after the longest delay,
//! each order a 201 (counted in [`BATCH_REQUESTS`]).

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Batch requests received so far, by every stand-in of the test binary.
pub static BATCH_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// How late to answer one request, decided when it arrives.
pub type Delay = Arc<dyn Fn() -> Option<Duration> + Send + Sync>;

/// Starts the stand-in; returns its URL.
pub async fn fake_gateway(order: Delay, cancel: Delay) -> String {
    let next_id = Arc::new(AtomicU64::new(1));
    let (batch_delay, batch_ids) = (order.clone(), next_id.clone());
    let app = Router::new()
        .route(
            "/v1/orders/batch",
            post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                let (delay, next_id) = (batch_delay.clone(), batch_ids.clone());
                async move {
                    BATCH_REQUESTS.fetch_add(1, Ordering::SeqCst);
                    let n = body["orders"].as_array().map_or(0, Vec::len);
                    let delays: Vec<Option<Duration>> = (0..n).map(|_| delay()).collect();
                    wait(delays.into_iter().try_fold(Duration::ZERO, |a, d| Some(a.max(d?))))
                        .await;
                    let results: Vec<serde_json::Value> = (0..n)
                        .map(|_| {
                            let id = next_id.fetch_add(1, Ordering::SeqCst);
                            serde_json::json!({"http_status": 201, "answer": {"order_id": id, "status": "new", "fills": []}})
                        })
                        .collect();
                    axum::Json(serde_json::json!({ "results": results }))
                }
            }),
        )
        .route(
            "/v1/orders",
            post(move || {
                let (delay, next_id) = (order.clone(), next_id.clone());
                async move {
                    wait(delay()).await;
                    let id = next_id.fetch_add(1, Ordering::SeqCst);
                    (
                        StatusCode::CREATED,
                        axum::Json(
                            serde_json::json!({"order_id": id, "status": "new", "fills": []}),
                        ),
                    )
                }
            }),
        )
        .route(
            "/v1/orders/{id}",
            delete(move || {
                let delay = cancel.clone();
                async move {
                    wait(delay()).await;
                    axum::Json(serde_json::json!({"status": "cancelled"}))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn wait(delay: Option<Duration>) {
    match delay {
        None => std::future::pending::<()>().await,
        Some(d) if !d.is_zero() => tokio::time::sleep(d).await,
        Some(_) => {}
    }
}
