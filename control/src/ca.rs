//! The sandboxes' certificate authorities on the host, and the endpoint that
//! hands a sandbox its CA certificate.
//!
//! Each sandbox gets its own CA ([`SandboxCa`]: ECDSA P-256, path length 0)
//! when it is created. Its proxy mints leaf certificates from it for the
//! transform domains it intercepts; the sandbox trusts its certificate (the
//! runtime installs a bundle of the host's roots plus it). The files:
//!
//! ```text
//! <state_dir>/ca/                  0700
//!     <sandbox id>/                0700
//!         ca.pem                   0644  the certificate (public)
//!         ca.key                   0600  its private key: never leaves the host
//! ```
//!
//! Both files are written atomically (temporary file, fsync, rename, fsync of
//! the directory). A restarted daemon reloads the same CA, so the bundle the
//! guest already trusts stays valid; a CA that is missing or does not load is
//! replaced by a new one (with a warning). Deleting the sandbox removes its
//! directory. The state dir is hidden inside every sandbox (see
//! [`crate::runtime::netns`]), so no sandbox process can read a key.
//!
//! The endpoint: plain HTTP `GET /ca.pem` on the sandbox's gateway
//! (`10.0.2.2:80`, `[fd00:7467::2]:80`, see [`crate::net::open_ca_listeners`]),
//! served from the sandbox's router namespace with no credentials: the
//! certificate is public and each router namespace only ever serves its own
//! sandbox's.

use std::convert::Infallible;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;
use tollgate_proxy::intercept::{CaError, SandboxCa};

/// Directory of the CAs inside the state dir.
pub const CA_DIR: &str = "ca";
/// The CA certificate's file name.
pub const CERT_FILE: &str = "ca.pem";
/// The CA key's file name.
pub const KEY_FILE: &str = "ca.key";
/// Path of the certificate on the in-sandbox endpoint.
pub const ENDPOINT_PATH: &str = "/ca.pem";
/// Media type of the certificate.
pub const PEM_CONTENT_TYPE: &str = "application/x-pem-file";

/// Connections one sandbox may hold open to its CA endpoint at once.
const ENDPOINT_MAX_CONNECTIONS: usize = 16;
/// A request head must arrive within this time.
const ENDPOINT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection to the endpoint is closed after this long, whatever it does.
const ENDPOINT_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Why a CA could not be stored, loaded or removed.
#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    /// The sandbox id cannot name a directory.
    #[error("invalid sandbox id {0:?}")]
    BadId(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Generating, loading or using the CA failed.
    #[error("sandbox CA: {0}")]
    Ca(#[from] CaError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaStoreError + '_ {
    move |source| CaStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The sandboxes' CAs under one directory (`<state_dir>/ca`).
#[derive(Clone, Debug)]
pub struct CaStore {
    root: PathBuf,
}

impl CaStore {
    /// The CAs kept under `root` (created 0700 on first write).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The CAs of the daemon whose state dir is `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self::new(state_dir.join(CA_DIR))
    }

    /// The directory of all CAs.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of sandbox `id`'s CA.
    pub fn dir(&self, id: &str) -> Result<PathBuf, CaStoreError> {
        if !crate::validate::is_path_component(id, 128) {
            return Err(CaStoreError::BadId(id.to_string()));
        }
        Ok(self.root.join(id))
    }

    /// Path of sandbox `id`'s certificate.
    pub fn cert_path(&self, id: &str) -> Result<PathBuf, CaStoreError> {
        Ok(self.dir(id)?.join(CERT_FILE))
    }

    /// Path of sandbox `id`'s key.
    pub fn key_path(&self, id: &str) -> Result<PathBuf, CaStoreError> {
        Ok(self.dir(id)?.join(KEY_FILE))
    }

    /// Generates a new CA for sandbox `id` and stores it, replacing any
    /// earlier one.
    pub fn create(&self, id: &str) -> Result<Arc<SandboxCa>, CaStoreError> {
        let dir = self.dir(id)?;
        let ca = SandboxCa::generate(id)?;
        private_dir(&self.root)?;
        private_dir(&dir)?;
        // The key first: a certificate on disk always has its key beside it.
        write_atomic(&dir, KEY_FILE, ca.key_pem().as_bytes(), 0o600)?;
        write_atomic(&dir, CERT_FILE, ca.cert_pem().as_bytes(), 0o644)?;
        Ok(Arc::new(ca))
    }

    /// Reloads sandbox `id`'s stored CA (certificate and key must match).
    pub fn load(&self, id: &str) -> Result<Arc<SandboxCa>, CaStoreError> {
        let dir = self.dir(id)?;
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let ca = SandboxCa::from_pem(id, &cert, &key)?;
        // Whatever happened to the modes meanwhile, the key stays private.
        for (p, mode) in [(&dir, 0o700), (&key_path, 0o600)] {
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io_err(p))?;
        }
        Ok(Arc::new(ca))
    }

    /// Sandbox `id`'s stored CA, or a new one (stored) when it is missing or
    /// does not load; the second value says whether it was replaced.
    pub fn load_or_create(&self, id: &str) -> Result<(Arc<SandboxCa>, bool), CaStoreError> {
        match self.load(id) {
            Ok(ca) => Ok((ca, false)),
            Err(e @ CaStoreError::BadId(_)) => Err(e),
            Err(e) => {
                tracing::warn!(
                    sandbox = %id, error = %e,
                    "the sandbox's CA cannot be reloaded: a new one is created; \
                     the sandbox must fetch its CA certificate again"
                );
                Ok((self.create(id)?, true))
            }
        }
    }

    /// Sandbox `id`'s stored certificate, if there is one.
    pub fn cert_pem(&self, id: &str) -> Option<String> {
        fs::read_to_string(self.cert_path(id).ok()?).ok()
    }

    /// Removes sandbox `id`'s CA (idempotent).
    pub fn remove(&self, id: &str) -> Result<(), CaStoreError> {
        let dir = self.dir(id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }
}

/// Creates `dir` if needed and makes it 0700.
fn private_dir(dir: &Path) -> Result<(), CaStoreError> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

fn sync_dir(dir: &Path) -> Result<(), CaStoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `dir/name` atomically with `mode`: a temporary file created with
/// that mode in the same directory, written and fsynced, renamed over the
/// target, then the directory fsynced. A reader sees the old file or the
/// complete new one, never a part, and the data never exists with a wider
/// mode.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), CaStoreError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let target = dir.join(name);
    let written = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; never widened it.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&target)(e));
    }
    sync_dir(dir)
}

// ---------------------------------------------------------------------------
// the in-sandbox endpoint

/// Connection slots of one sandbox's CA endpoint (shared by its v4 and v6
/// listeners).
pub fn endpoint_slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(ENDPOINT_MAX_CONNECTIONS))
}

/// The endpoint's answer to one request: `GET` / `HEAD /ca.pem` → 200 with
/// the certificate; another method on it → 405; any other path → 404.
pub fn endpoint_response<B>(req: &Request<B>, pem: &Bytes) -> Response<Full<Bytes>> {
    let (status, body, content_type) = if req.uri().path() != ENDPOINT_PATH {
        (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            "text/plain",
        )
    } else if req.method() == Method::GET || req.method() == Method::HEAD {
        (StatusCode::OK, pem.clone(), PEM_CONTENT_TYPE)
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"method not allowed\n"),
            "text/plain",
        )
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    resp
}

/// Serves the CA endpoint on `listener` until the task is aborted: HTTP/1.1,
/// at most 16 connections per sandbox (`slots`, from [`endpoint_slots`];
/// more are closed at once), a request head within 10 s, each connection
/// closed after 30 s.
pub async fn serve_endpoint(
    id: String,
    listener: tokio::net::TcpListener,
    pem: Bytes,
    slots: Arc<Semaphore>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(sandbox = %id, error = %e, "CA endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(sandbox = %id, "CA endpoint: too many connections");
            continue;
        };
        let pem = pem.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = endpoint_response(&req, &pem);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ENDPOINT_HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(ENDPOINT_CONNECTION_LIFETIME, conn).await;
        });
    }
}

#[cfg(test)]
mod tests;

/// A trust bundle: `roots` (PEM, possibly empty) followed by `ca_pem`, each
/// ending in a newline. What a sandbox's `SSL_CERT_FILE` & co. point at.
pub fn trust_bundle(roots: &[u8], ca_pem: &str) -> Vec<u8> {
    let mut bundle = roots.to_vec();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    if !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle
}
