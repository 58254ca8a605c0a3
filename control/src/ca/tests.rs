use std::os::unix::fs::PermissionsExt;

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct Tmp(PathBuf);

impl Tmp {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tollgate-ca-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

#[test]
fn create_stores_private_key_and_public_certificate() {
    let t = Tmp::new("create");
    let store = CaStore::in_state_dir(&t.0);
    let ca = store.create("sbx-one").expect("create");
    assert_eq!(store.root(), t.0.join("ca"));
    let dir = t.0.join("ca").join("sbx-one");
    assert_eq!(mode(&t.0.join("ca")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.pem")), 0o644);
    assert_eq!(
        fs::read_to_string(dir.join("ca.pem")).expect("cert"),
        ca.cert_pem()
    );
    assert_eq!(
        fs::read_to_string(dir.join("ca.key")).expect("key"),
        ca.key_pem()
    );
    assert_eq!(store.cert_pem("sbx-one").as_deref(), Some(ca.cert_pem()));
    // No temporary file is left behind.
    let names: Vec<String> = fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn load_returns_the_same_ca_and_repairs_modes() {
    let t = Tmp::new("load");
    let store = CaStore::in_state_dir(&t.0);
    let ca = store.create("sbx-two").expect("create");
    let key = store.key_path("sbx-two").expect("path");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let again = store.load("sbx-two").expect("load");
    assert_eq!(again.cert_pem(), ca.cert_pem());
    assert_eq!(mode(&key), 0o600);
    // A leaf minted by the reloaded CA chains to the stored certificate.
    let (loaded, replaced) = store.load_or_create("sbx-two").expect("load_or_create");
    assert!(!replaced);
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    loaded.mint("api.example.com").expect("mint");
}

#[test]
fn missing_or_broken_ca_is_replaced() {
    let t = Tmp::new("broken");
    let store = CaStore::in_state_dir(&t.0);
    let (fresh, replaced) = store.load_or_create("sbx-new").expect("missing → created");
    assert!(replaced);
    assert_eq!(store.cert_pem("sbx-new").as_deref(), Some(fresh.cert_pem()));

    // A key that belongs to another CA does not load.
    let other = store.create("sbx-other").expect("create");
    let dir = store.dir("sbx-new").expect("dir");
    fs::write(dir.join("ca.key"), other.key_pem()).expect("swap key");
    assert!(matches!(store.load("sbx-new"), Err(CaStoreError::Ca(_))));
    let (replacement, replaced) = store.load_or_create("sbx-new").expect("replaced");
    assert!(replaced);
    assert_ne!(replacement.cert_pem(), fresh.cert_pem());
    assert_eq!(
        store.load("sbx-new").expect("loads now").cert_pem(),
        replacement.cert_pem()
    );

    // Garbage.
    fs::write(dir.join("ca.pem"), "not a certificate").expect("garbage");
    assert!(store.load("sbx-new").is_err());
}

#[test]
fn remove_is_idempotent_and_ids_cannot_escape() {
    let t = Tmp::new("remove");
    let store = CaStore::in_state_dir(&t.0);
    store.create("sbx-gone").expect("create");
    store.remove("sbx-gone").expect("remove");
    assert!(!t.0.join("ca").join("sbx-gone").exists());
    assert!(store.cert_pem("sbx-gone").is_none());
    store.remove("sbx-gone").expect("second remove");
    store.remove("sbx-never").expect("never created");
    for bad in ["", ".", "..", "../x", "a/b", "a b", "x\0"] {
        assert!(
            matches!(store.dir(bad), Err(CaStoreError::BadId(_))),
            "{bad:?}"
        );
        assert!(store.remove(bad).is_err(), "{bad:?}");
        assert!(store.load_or_create(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn write_atomic_replaces_with_the_given_mode() {
    let t = Tmp::new("atomic");
    write_atomic(&t.0, "f", b"one", 0o600).expect("write");
    write_atomic(&t.0, "f", b"two", 0o640).expect("rewrite");
    assert_eq!(fs::read(t.0.join("f")).expect("read"), b"two");
    assert_eq!(mode(&t.0.join("f")), 0o640);
    assert_eq!(fs::read_dir(&t.0).expect("dir").count(), 1);
}

#[test]
fn endpoint_serves_only_the_certificate() {
    let pem = Bytes::from_static(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n");
    let req = |m: Method, path: &str| {
        Request::builder()
            .method(m)
            .uri(path)
            .body(())
            .expect("request")
    };
    let ok = endpoint_response(&req(Method::GET, "/ca.pem"), &pem);
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()[header::CONTENT_TYPE], PEM_CONTENT_TYPE);
    let head = endpoint_response(&req(Method::HEAD, "/ca.pem?x=1"), &pem);
    assert_eq!(head.status(), StatusCode::OK);
    let post = endpoint_response(&req(Method::POST, "/ca.pem"), &pem);
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    for path in ["/", "/ca.key", "/ca.pem/", "/../ca.key"] {
        let r = endpoint_response(&req(Method::GET, path), &pem);
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
}
