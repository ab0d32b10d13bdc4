//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (process alive) and `/readyz`
//! (streaming and progressing). Three GET routes need no web framework, only HTTP/1.1 basics.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ops::metrics::{Health, Metrics};

/// A request line and headers larger than this are refused; probes send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// Binds `addr` now (so a bad address fails at start) and serves in the background.
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (metrics, health) = (metrics.clone(), health.clone());
                    tokio::spawn(async move {
                        // A slow or silent client must not pin a task forever.
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            respond(stream, &metrics, &health),
                        )
                        .await;
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn respond(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    loop {
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST {
            return write(&mut stream, 431, "text/plain", b"request too large\n").await;
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return write(&mut stream, 405, "text/plain", b"only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = metrics.render();
            write(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => write(&mut stream, 200, "text/plain", b"ok\n").await,
        "/readyz" => match health.readiness() {
            Ok(()) => write(&mut stream, 200, "text/plain", b"ready\n").await,
            Err(why) => {
                write(
                    &mut stream,
                    503,
                    "text/plain",
                    format!("{why}\n").as_bytes(),
                )
                .await
            }
        },
        _ => {
            write(
                &mut stream,
                404,
                "text/plain",
                b"not found: try /metrics, /healthz, /readyz\n",
            )
            .await
        }
    }
}

async fn write(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
