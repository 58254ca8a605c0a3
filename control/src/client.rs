//! A minimal client of the daemon's API for the CLI (`tollgate exec`). It
//! finds the daemon through `TOLLGATE_API_URL` and authenticates with
//! `TOLLGATE_API_KEY`.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Default daemon address.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

/// Sends one JSON request and returns status and parsed body.
pub async fn call(
    base: &str,
    key: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let uri: http::Uri = format!("{}{}", base.trim_end_matches('/'), path).parse()?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "TOLLGATE_API_URL must be an http:// URL, got {base}"
    );
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("TOLLGATE_API_URL has no host: {base}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the tollgate daemon at {base}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let payload = match body {
        Some(v) => Bytes::from(serde_json::to_vec(v)?),
        None => Bytes::new(),
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(http::header::HOST, authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(payload))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Ok((status, value))
}
