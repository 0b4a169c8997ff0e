//! Readiness checks: tiny protocol clients with short timeouts, and a poll loop with a deadline.
//!
//! No HTTP or AMQP library is pulled in for this: a readiness check needs a status line (HTTP)
//! or the server's first frame (AMQP), nothing more. Nothing here sleeps "until it starts": the
//! loop retries a cheap check every [`POLL_INTERVAL`] and the caller owns the deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Pause between two failed checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Timeout of one check attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `check` until it succeeds or `deadline` passes; the error names `what` and carries the
/// last failure.
pub async fn poll_until<F, Fut, T>(what: &str, deadline: Instant, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("check still running at the deadline"),
        };
        if Instant::now() + POLL_INTERVAL >= deadline {
            return Err(last.context(format!("{what}: not ready before the deadline")));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `GET path` over HTTP/1.0; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        // HTTP/1.0 so the server neither keeps the connection nor chunks the body.
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lab\r\nAccept: */*\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .context("sending the request")?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .context("reading the response")?;
        let text = String::from_utf8_lossy(&raw);
        let status_line = text.lines().next().unwrap_or_default();
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        anyhow::Ok((code, body))
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// Succeeds when `GET path` answers 200.
pub async fn http_ok(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let (code, body) = http_get(addr, path).await?;
    if code != 200 {
        let body: String = body.chars().take(200).collect();
        bail!("GET http://{addr}{path} answered {code}: {body}");
    }
    Ok(())
}

/// Sends the AMQP 0-9-1 protocol header and expects the broker's first frame
/// (`Connection.Start`: a method frame on channel 0).
pub async fn amqp_handshake(addr: SocketAddr) -> anyhow::Result<()> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .context("sending the AMQP header")?;
        let mut frame = [0u8; 7];
        stream
            .read_exact(&mut frame)
            .await
            .context("reading the first AMQP frame")?;
        if frame[0] != 1 || frame[1] != 0 || frame[2] != 0 {
            bail!("unexpected first AMQP frame header {frame:?}");
        }
        anyhow::Ok(())
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .with_context(|| format!("AMQP handshake with {addr} timed out"))?
}

/// Logs in over AMQP 0-9-1 (PLAIN) and opens `vhost`, then closes the connection politely:
/// proves the broker listens, the user exists with that password and may use the vhost.
pub async fn amqp_login(
    addr: SocketAddr,
    user: &str,
    password: &str,
    vhost: &str,
) -> anyhow::Result<()> {
    let attempt = async {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .context("sending the AMQP header")?;
        expect_method(&mut s, (10, 10), "Connection.Start").await?;
        let mut args = Vec::new();
        args.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
        push_short_str(&mut args, "PLAIN");
        let response = format!("\0{user}\0{password}");
        args.extend_from_slice(&(response.len() as u32).to_be_bytes());
        args.extend_from_slice(response.as_bytes());
        push_short_str(&mut args, "en_US");
        send_method(&mut s, (10, 11), &args).await?;
        let tune = expect_method(&mut s, (10, 30), "Connection.Tune (login refused?)").await?;
        let mut tune_ok = tune.get(..6).context("short Connection.Tune")?.to_vec();
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        send_method(&mut s, (10, 31), &tune_ok).await?;
        let mut open = Vec::new();
        push_short_str(&mut open, vhost);
        push_short_str(&mut open, "");
        open.push(0);
        send_method(&mut s, (10, 40), &open).await?;
        expect_method(&mut s, (10, 41), "Connection.OpenOk").await?;
        let mut close = 200u16.to_be_bytes().to_vec();
        push_short_str(&mut close, "lab readiness check");
        close.extend_from_slice(&[0, 0, 0, 0]);
        send_method(&mut s, (10, 50), &close).await?;
        expect_method(&mut s, (10, 51), "Connection.CloseOk").await?;
        anyhow::Ok(())
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .with_context(|| format!("AMQP login at {addr} timed out"))?
}

fn push_short_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(s.len().min(255) as u8);
    buf.extend_from_slice(&s.as_bytes()[..s.len().min(255)]);
}

async fn send_method(
    s: &mut TcpStream,
    (class, method): (u16, u16),
    args: &[u8],
) -> anyhow::Result<()> {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(args);
    let mut frame = vec![1u8, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    s.write_all(&frame)
        .await
        .with_context(|| format!("sending AMQP method {class}.{method}"))
}

/// Reads one method frame on channel 0 and checks it is `want`; returns its arguments. A
/// `Connection.Close` from the broker becomes an error with its reply text.
async fn expect_method(s: &mut TcpStream, want: (u16, u16), what: &str) -> anyhow::Result<Vec<u8>> {
    let mut header = [0u8; 7];
    s.read_exact(&mut header)
        .await
        .with_context(|| format!("waiting for {what}"))?;
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    anyhow::ensure!(
        header[0] == 1 && (4..1 << 20).contains(&size),
        "unexpected AMQP frame {header:?} waiting for {what}"
    );
    let mut payload = vec![0u8; size + 1];
    s.read_exact(&mut payload)
        .await
        .with_context(|| format!("reading {what}"))?;
    let class = u16::from_be_bytes([payload[0], payload[1]]);
    let method = u16::from_be_bytes([payload[2], payload[3]]);
    let args = payload[4..size].to_vec();
    if (class, method) == (10, 50) && want != (10, 50) {
        let code = args
            .get(..2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .unwrap_or(0);
        let len = args.get(2).copied().unwrap_or(0) as usize;
        let text = args
            .get(3..3 + len)
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        bail!("the broker closed the connection waiting for {what}: {code} {text}");
    }
    anyhow::ensure!(
        (class, method) == want,
        "got AMQP method {class}.{method} waiting for {what}"
    );
    Ok(args)
}

/// Asks an epmd at `addr` for its registered names (`NAMES_REQ`) and expects the 4-byte
/// port answer: a real protocol exchange, so epmd does not log a broken request.
pub async fn epmd_names(addr: SocketAddr) -> anyhow::Result<()> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream
            .write_all(&[0, 1, b'n'])
            .await
            .context("sending NAMES_REQ")?;
        let mut port = [0u8; 4];
        stream
            .read_exact(&mut port)
            .await
            .context("reading the NAMES_REQ answer")?;
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .await
            .context("reading the names")?;
        anyhow::Ok(())
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .with_context(|| format!("epmd request to {addr} timed out"))?
}

/// Succeeds when something accepts TCP connections at `addr`.
pub async fn tcp_open(addr: SocketAddr) -> anyhow::Result<()> {
    timeout(ATTEMPT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn http_ok_reads_the_status_line() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["503 Service Unavailable", "200 OK"] {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nhi").as_bytes(),
                    )
                    .await;
            }
        });
        let first = http_ok(addr, "/readyz")
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(first.contains("503"), "{first}");
        let deadline = Instant::now() + Duration::from_secs(5);
        poll_until("test server", deadline, || http_ok(addr, "/readyz"))
            .await
            .expect("second answer is 200");
    }

    #[tokio::test]
    async fn poll_until_names_what_and_why() {
        let deadline = Instant::now() + Duration::from_millis(250);
        let err = poll_until("nothing", deadline, || async {
            anyhow::Result::<()>::Err(anyhow::anyhow!("refused"))
        })
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(err.contains("nothing") && err.contains("refused"), "{err}");
    }
}
