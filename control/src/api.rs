//! The Leap0-compatible HTTP API (hyper 1.x). Routing, authentication, the
//! contract's JSON bodies, and one place that turns errors into responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tollgate_proxy::policy::FieldError;

use crate::model::{rfc3339, SandboxRecord, SnapshotRecord, State};
use crate::runtime::Runtime;
use crate::service::{Service, ServiceError};
use crate::validate::{
    parse_policy_update, CreateRequest, EventsQuery, ExecRequestBody, ListQuery, RestoreRequest,
    SnapshotRequest,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// An error response: status plus the contract's JSON body.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `message` of the body.
    pub message: String,
    /// `errors` of a 400 body.
    pub errors: Vec<FieldError>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            errors: Vec::new(),
        }
    }

    fn invalid(errors: Vec<FieldError>) -> Self {
        let n = errors.len();
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "request validation failed: {n} invalid field{}",
                if n == 1 { "" } else { "s" }
            ),
            errors,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let body = if self.status == StatusCode::BAD_REQUEST {
            json!({ "message": self.message, "errors": self.errors })
        } else {
            json!({ "message": self.message })
        };
        json_response(self.status, &body)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(errs) => ApiError::invalid(errs),
            ServiceError::NotFound(what) => {
                ApiError::new(StatusCode::NOT_FOUND, format!("{what} not found"))
            }
            ServiceError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            e @ ServiceError::OrgLimit(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            }
            e @ ServiceError::Capacity(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            e
            @ (ServiceError::Runtime(_) | ServiceError::Store(_) | ServiceError::Dataplane(_)) => {
                tracing::error!(error = %e, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// API keys → organization name.
#[derive(Clone, Debug, Default)]
pub struct Keys(pub HashMap<String, String>);

impl Keys {
    /// The organization a request authenticates as: `Authorization: Bearer KEY`
    /// (or the bare key) or `X-API-Key: KEY`.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<&str, ApiError> {
        let from_header = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let from_authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let v = v.trim();
                match v.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => v,
                }
            })
            .filter(|k| !k.is_empty());
        let key = match (from_header, from_authorization) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "X-API-Key and Authorization carry different API keys",
                ))
            }
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) => {
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing API key"));
            }
        };
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key"))
    }
}

/// Shared state of the HTTP server.
pub struct Api<R: Runtime> {
    /// The lifecycle service.
    pub service: Arc<Service<R>>,
    /// Authentication.
    pub keys: Keys,
}

// === JSON shapes ===

/// A sandbox as every sandbox endpoint returns it (secrets redacted). The SDK
/// reads `memory` / `disk`; the resume contract names them `memory_mib` /
/// `disk_mib`: both are present.
pub fn sandbox_json(r: &SandboxRecord) -> Value {
    let mut v = json!({
        "id": r.id,
        "template_id": r.template_id,
        "vcpu": r.vcpu,
        "memory_mib": r.memory_mib,
        "memory": r.memory_mib,
        "disk_mib": r.disk_mib,
        "disk": r.disk_mib,
        "timeout": r.timeout_secs,
        "state": r.state.as_str(),
        "auto_pause": r.auto_pause,
        "network_policy": r.network_policy.redacted(),
        "created_at": rfc3339(r.created_at),
    });
    if let (Some(reason), Some(obj)) = (&r.status_reason, v.as_object_mut()) {
        obj.insert("status_reason".into(), json!(reason));
    }
    v
}

fn sandbox_item_json(r: &SandboxRecord) -> Value {
    json!({
        "id": r.id,
        "template_id": r.template_id,
        "state": r.state.as_str(),
        "launch_time": rfc3339(r.created_at),
        "state_change_time": rfc3339(r.state_changed_at),
        "timeout_at": r.timeout_at,
        "created_at": rfc3339(r.created_at),
    })
}

/// A snapshot as the snapshot endpoints return it (secrets redacted).
pub fn snapshot_json(s: &SnapshotRecord) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "template_id": s.template_id,
        "vcpu": s.vcpu,
        "memory_mib": s.memory_mib,
        "memory": s.memory_mib,
        "disk_mib": s.disk_mib,
        "disk": s.disk_mib,
        "network_policy": s.network_policy.redacted(),
        "created_at": rfc3339(s.created_at),
    })
}

fn page<T>(mut items: Vec<T>, q: &ListQuery, to_json: impl Fn(&T) -> Value) -> Value {
    let total = items.len();
    let start = (q.page - 1).saturating_mul(q.page_size).min(total);
    let end = start.saturating_add(q.page_size).min(total);
    let items: Vec<Value> = items.drain(start..end).map(|x| to_json(&x)).collect();
    json!({ "items": items, "total_items": total })
}

// === impl Api ===

impl<R: Runtime> Api<R> {
    /// Serves one request; never fails (errors become responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let resp = match self.route(req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        tracing::info!(
            target: "tollgate::access",
            %method, %path, status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64, "request"
        );
        Ok(resp)
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let query = req.uri().query().map(str::to_string);
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();

        // Unauthenticated endpoints.
        match (&method, segs.as_slice()) {
            (&Method::GET, ["v1", "openapi.json"]) => {
                return Ok(json_response(StatusCode::OK, &crate::openapi::document()));
            }
            (&Method::GET, ["healthz"]) => {
                return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
            }
            _ => {}
        }
        if !matches!(segs.first(), Some(&"v1")) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no such endpoint"));
        }
        let org = self.keys.authenticate(req.headers())?.to_string();
        let svc = self.service.clone();
        match (method.clone(), &segs[1..]) {
            (Method::POST, ["snapshot", "resume"]) => {
                let body = read_json(req).await?;
                let r = RestoreRequest::parse_resume(&body).map_err(ApiError::invalid)?;
                let s = detached(svc, move |svc| async move { svc.restore(&org, r).await }).await?;
                Ok(json_response(StatusCode::CREATED, &sandbox_json(&s)))
            }
            (Method::POST, ["snapshot", "restore"]) => {
                let body = read_json(req).await?;
                let r = RestoreRequest::parse_restore(&body).map_err(ApiError::invalid)?;
                let s = detached(svc, move |svc| async move { svc.restore(&org, r).await }).await?;
                Ok(json_response(StatusCode::CREATED, &sandbox_json(&s)))
            }
            (Method::POST, ["sandbox"]) => {
                let body = read_json(req).await?;
                let r = CreateRequest::parse(&body).map_err(ApiError::invalid)?;
                let s = detached(svc, move |svc| async move { svc.create(&org, r).await }).await?;
                Ok(json_response(StatusCode::CREATED, &sandbox_json(&s)))
            }
            (Method::GET, ["sandboxes"]) => {
                let q = ListQuery::parse(query.as_deref(), &["created_at", "state"], "state")
                    .map_err(ApiError::invalid)?;
                if let Some(st) = &q.filter {
                    if State::parse(st).is_none() {
                        return Err(ApiError::invalid(vec![FieldError {
                            field: "state".into(),
                            error: "must be one of starting, running, snapshotting, paused, unpausing, deleting, deleted".into(),
                        }]));
                    }
                }
                let mut items: Vec<SandboxRecord> = svc
                    .list(&org)
                    .into_iter()
                    .filter(|r| q.filter.as_deref().is_none_or(|f| r.state.as_str() == f))
                    .collect();
                items.sort_by(|a, b| {
                    let o = if q.sort == "state" {
                        a.state
                            .as_str()
                            .cmp(b.state.as_str())
                            .then(a.created_at.cmp(&b.created_at))
                    } else {
                        a.created_at.cmp(&b.created_at)
                    }
                    .then_with(|| a.id.cmp(&b.id));
                    if q.asc {
                        o
                    } else {
                        o.reverse()
                    }
                });
                Ok(json_response(
                    StatusCode::OK,
                    &page(items, &q, sandbox_item_json),
                ))
            }
            (Method::GET, ["sandbox", id] | ["sandbox", id, ""]) => Ok(json_response(
                StatusCode::OK,
                &sandbox_json(&svc.get(&org, id)?),
            )),
            (Method::DELETE, ["sandbox", id] | ["sandbox", id, ""]) => {
                let id = id.to_string();
                detached(svc, move |svc| async move { svc.delete(&org, &id).await }).await?;
                Ok(empty(StatusCode::NO_CONTENT))
            }
            (Method::POST, ["sandbox", id, "pause"]) => {
                let id = id.to_string();
                let s = detached(svc, move |svc| async move { svc.pause(&org, &id).await }).await?;
                Ok(json_response(StatusCode::CREATED, &sandbox_json(&s)))
            }
            (Method::POST, ["sandbox", id, "resume"]) => {
                let id = id.to_string();
                let s = detached(
                    svc,
                    move |svc| async move { svc.resume_paused(&org, &id).await },
                )
                .await?;
                Ok(json_response(StatusCode::CREATED, &sandbox_json(&s)))
            }
            (Method::POST, ["sandbox", id, "snapshot", "create"]) => {
                let id = id.to_string();
                // 404 before anything else for an unknown sandbox.
                svc.get(&org, &id)?;
                let body = read_json_or_empty(req).await?;
                let r = SnapshotRequest::parse(&body).map_err(ApiError::invalid)?;
                let s = detached(
                    svc,
                    move |svc| async move { svc.snapshot(&org, &id, r).await },
                )
                .await?;
                Ok(json_response(StatusCode::CREATED, &snapshot_json(&s)))
            }
            (Method::PUT, ["sandbox", id, "network_policy"]) => {
                let id = id.to_string();
                svc.get(&org, &id)?;
                let body = read_json(req).await?;
                let p = parse_policy_update(&body).map_err(ApiError::invalid)?;
                let s = detached(
                    svc,
                    move |svc| async move { svc.set_policy(&org, &id, p).await },
                )
                .await?;
                Ok(json_response(StatusCode::OK, &sandbox_json(&s)))
            }
            (Method::GET, ["sandbox", id, "network", "events"]) => {
                let q = EventsQuery::parse(query.as_deref()).map_err(ApiError::invalid)?;
                let items = svc.network_events(&org, id, q.after, q.limit)?;
                let n = items.len();
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"items": items, "total_items": n}),
                ))
            }
            (Method::GET, ["sandbox", id, "ca.pem"]) => {
                let pem = svc.ca_pem(&org, id)?;
                let mut resp = Response::new(Full::new(Bytes::from(pem)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(crate::ca::PEM_CONTENT_TYPE),
                );
                Ok(resp)
            }
            (Method::GET, ["sandbox", id, "network", "counters"]) => {
                let counters = svc.network_counters(&org, id)?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"sandbox_id": id, "counters": counters}),
                ))
            }
            (Method::POST, ["sandbox", id, "process", "execute"]) => {
                let id = id.to_string();
                svc.get(&org, &id)?;
                let body = read_json(req).await?;
                let r = ExecRequestBody::parse(&body).map_err(ApiError::invalid)?;
                let out = svc.exec(&org, &id, r).await?;
                Ok(json_response(StatusCode::OK, &json!(out)))
            }
            (Method::GET, ["snapshots"]) => {
                let q = ListQuery::parse(query.as_deref(), &["created_at", "template_id"], "query")
                    .map_err(ApiError::invalid)?;
                let mut items: Vec<SnapshotRecord> = svc
                    .snapshots(&org)
                    .into_iter()
                    .filter(|s| q.filter.as_deref().is_none_or(|f| s.name.contains(f)))
                    .collect();
                items.sort_by(|a, b| {
                    let o = if q.sort == "template_id" {
                        a.template_id
                            .cmp(&b.template_id)
                            .then(a.created_at.cmp(&b.created_at))
                    } else {
                        a.created_at.cmp(&b.created_at)
                    }
                    .then_with(|| a.id.cmp(&b.id));
                    if q.asc {
                        o
                    } else {
                        o.reverse()
                    }
                });
                Ok(json_response(
                    StatusCode::OK,
                    &page(items, &q, snapshot_json),
                ))
            }
            (Method::DELETE, ["snapshot", id] | ["snapshot", id, ""]) => {
                svc.delete_snapshot(&org, id)?;
                Ok(empty(StatusCode::NO_CONTENT))
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path}"),
            )),
        }
    }
}

/// Runs a lifecycle operation in its own task, so that a client that hangs
/// up mid-request cannot cancel it halfway (a half-created namespace, a
/// half-deleted sandbox).
async fn detached<R, T, F, Fut>(svc: Arc<Service<R>>, op: F) -> Result<T, ApiError>
where
    R: Runtime,
    T: Send + 'static,
    F: FnOnce(Arc<Service<R>>) -> Fut,
    Fut: std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
{
    match tokio::spawn(op(svc)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "lifecycle task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "lifecycle operation failed",
            ))
        }
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {MAX_BODY} bytes or was cut short"),
            )
        })
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(vec![FieldError {
            field: "body".into(),
            error: format!("is not valid JSON: {e}"),
        }])
    })
}

async fn read_json_or_empty(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = read_body(req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(vec![FieldError {
            field: "body".into(),
            error: format!("is not valid JSON: {e}"),
        }])
    })
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve<R: Runtime>(
    listener: tokio::net::TcpListener,
    api: Arc<Api<R>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| api.clone().handle(req));
            if let Err(e) = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
