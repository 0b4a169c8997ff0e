//! A stand-in for the order gateway, for the generator's tests: axum on a free loopback port,
//! answering `POST /v1/orders` with 201 and `DELETE /v1/orders/{id}` with 200 after the delay
//! that route's closure returns for each request (`None`: never answers).

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{delete, post};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How late to answer one request, decided when it arrives.
pub type Delay = Arc<dyn Fn() -> Option<Duration> + Send + Sync>;

/// Starts the stand-in; returns its URL.
pub async fn fake_gateway(order: Delay, cancel: Delay) -> String {
    let next_id = Arc::new(AtomicU64::new(1));
    let app = Router::new()
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
