//! The supervisor daemon's control channel: a Unix socket (`<root>/control.sock`, mode 0600)
//! speaking JSON lines — one [`Request`] per connection, one [`Response`] back.
//!
//! ```text
//! {"op":"status"}
//! {"op":"stop","component":"rabbitmq"}          held down until started
//! {"op":"start","component":"rabbitmq"}         answered once ready
//! {"op":"restart","component":"rabbitmq"}       answered once ready
//! {"op":"kill","component":"rabbitmq","signal":"SIGKILL"}
//! {"op":"shutdown"}                             answered at once; the daemon then stops everything and exits
//! ```

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::component::Component;
use crate::lab::Lab;
use crate::process::parse_signal;
use crate::state::LabState;

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Status,
    Stop {
        component: Component,
    },
    Start {
        component: Component,
    },
    Restart {
        component: Component,
    },
    Kill {
        component: Component,
        signal: String,
    },
    Shutdown,
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What happened, for a person.
    #[serde(default)]
    pub message: String,
    /// The state after the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<LabState>,
}

impl Response {
    fn ok(message: String, state: LabState) -> Self {
        Response {
            ok: true,
            message,
            state: Some(state),
        }
    }

    fn err(message: String) -> Self {
        Response {
            ok: false,
            message,
            state: None,
        }
    }
}

/// Binds the control socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(listener)
}

/// Serves requests until the task is dropped. `shutdown` is notified on a shutdown request.
pub async fn serve(listener: UnixListener, lab: Arc<Lab>, shutdown: Arc<Notify>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                continue;
            }
        };
        let lab = lab.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &lab, &shutdown).await {
                tracing::warn!(error = %format!("{e:#}"), "control request failed");
            }
        });
    }
}

async fn handle(
    stream: tokio::net::UnixStream,
    lab: &Lab,
    shutdown: &Notify,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read)
        .read_line(&mut line)
        .await
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => {
            tracing::info!(?request, "control request");
            execute(request, lab, shutdown).await
        }
        Err(e) => Response::err(format!("bad request {:?}: {e}", line.trim())),
    };
    let mut text = serde_json::to_string(&response).context("encoding the response")?;
    text.push('\n');
    write
        .write_all(text.as_bytes())
        .await
        .context("writing the response")?;
    Ok(())
}

async fn execute(request: Request, lab: &Lab, shutdown: &Notify) -> Response {
    let result = match &request {
        Request::Status => Ok("status".to_string()),
        Request::Stop { component } => lab
            .stop(*component)
            .await
            .map(|()| format!("{component} stopped and held down")),
        Request::Start { component } => lab
            .start_component(*component)
            .await
            .map(|()| format!("{component} is ready")),
        Request::Restart { component } => lab
            .restart(*component)
            .await
            .map(|()| format!("{component} restarted and ready")),
        Request::Kill { component, signal } => match parse_signal(signal) {
            Ok(sig) => lab
                .kill(*component, sig)
                .map(|()| format!("{} sent to {component}", sig.as_str())),
            Err(e) => Err(e.into()),
        },
        Request::Shutdown => {
            shutdown.notify_one();
            Ok("shutting down".to_string())
        }
    };
    match result {
        Ok(message) => Response::ok(message, lab.status()),
        Err(e) => Response::err(e.to_string()),
    }
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .context("setting the read timeout")?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .context("setting the write timeout")?;
    let mut text = serde_json::to_string(request).context("encoding the request")?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .context("sending the request")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the answer (did the supervisor die?)")?;
    serde_json::from_str(line.trim())
        .with_context(|| format!("decoding the answer {:?}", line.trim()))
}

/// [`request`], and an error naming the request when the lab refused it (`ok: false`).
pub fn request_ok(socket: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Response> {
    let r = request(socket, req, timeout)?;
    if !r.ok {
        anyhow::bail!("lab refused {req:?}: {}", r.message);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_json_lines() {
        let cases = [
            (Request::Status, r#"{"op":"status"}"#),
            (
                Request::Stop {
                    component: Component::Rabbitmq,
                },
                r#"{"op":"stop","component":"rabbitmq"}"#,
            ),
            (
                Request::Kill {
                    component: Component::OrderGateway,
                    signal: "KILL".to_string(),
                },
                r#"{"op":"kill","component":"order-gateway","signal":"KILL"}"#,
            ),
            (Request::Shutdown, r#"{"op":"shutdown"}"#),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).ok().as_deref(), Some(json));
            assert_eq!(serde_json::from_str::<Request>(json).ok(), Some(request));
        }
    }
}
