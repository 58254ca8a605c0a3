#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::RootCertStore;

use super::*;

fn verifier(ca: &SandboxCa) -> Arc<WebPkiServerVerifier> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

fn verify_at(ca: &SandboxCa, leaf: &CertifiedKey, name: &str, at: SystemTime) -> bool {
    let now = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    verifier(ca)
        .verify_server_cert(
            &leaf.cert[0],
            &[],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            now,
        )
        .is_ok()
}

fn verify(ca: &SandboxCa, leaf: &CertifiedKey, name: &str) -> bool {
    verify_at(ca, leaf, name, SystemTime::now())
}

#[test]
fn leaf_validates_for_its_name_only() {
    let ca = SandboxCa::generate("sbx-a").unwrap();
    let leaf = ca.mint("api.test").unwrap();
    assert!(verify(&ca, &leaf, "api.test"));
    assert!(!verify(&ca, &leaf, "other.test"));
    assert!(!verify(&ca, &leaf, "x.api.test"));
}

#[test]
fn another_sandboxs_ca_does_not_validate_the_leaf() {
    let a = SandboxCa::generate("sbx-a").unwrap();
    let b = SandboxCa::generate("sbx-b").unwrap();
    let leaf = a.mint("api.test").unwrap();
    assert!(verify(&a, &leaf, "api.test"));
    assert!(!verify(&b, &leaf, "api.test"));
}

#[test]
fn a_stale_guest_clock_still_accepts_the_leaf_and_validity_is_under_a_year() {
    let ca = SandboxCa::generate("sbx-a").unwrap();
    let leaf = ca.mint("api.test").unwrap();
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    assert!(verify_at(&ca, &leaf, "api.test", now - 150 * day));
    assert!(verify_at(&ca, &leaf, "api.test", now + 150 * day));
    // Bounded on both sides: 180 days back, 180 days ahead.
    assert!(!verify_at(
        &ca,
        &leaf,
        "api.test",
        now - LEAF_BACKDATE - day
    ));
    assert!(!verify_at(
        &ca,
        &leaf,
        "api.test",
        now + LEAF_LIFETIME + day
    ));
    assert!(LEAF_BACKDATE + LEAF_LIFETIME <= 365 * day);
}

#[test]
fn ca_has_path_length_zero_and_leaf_is_server_auth_only() {
    let ca = SandboxCa::generate("sbx-a").unwrap();
    // basicConstraints value: SEQUENCE { BOOLEAN TRUE, INTEGER 0 }.
    let bc = [0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00];
    assert!(ca.cert_der().windows(bc.len()).any(|w| w == bc));
    let leaf = ca.mint("api.test").unwrap();
    let der = leaf.cert[0].as_ref();
    // extKeyUsage value: SEQUENCE { id-kp-serverAuth } and nothing else.
    let eku = [
        0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01,
    ];
    assert!(der.windows(eku.len()).any(|w| w == eku));
    // id-ce-authorityKeyIdentifier (2.5.29.35) is present.
    let aki = [0x06, 0x03, 0x55, 0x1d, 0x23];
    assert!(der.windows(aki.len()).any(|w| w == aki));
    // Not a CA itself: a certificate it "signs" would not chain (pathlen 0
    // and no keyCertSign); at least it must not claim CA:TRUE.
    assert!(!der.windows(bc.len()).any(|w| w == bc));
}

#[test]
fn reloaded_ca_mints_leaves_that_chain_to_the_stored_certificate() {
    let ca = SandboxCa::generate("sbx-a").unwrap();
    let again = SandboxCa::from_pem("sbx-a", ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(again.cert_der(), ca.cert_der());
    let leaf = again.mint("api.test").unwrap();
    assert!(verify(&ca, &leaf, "api.test"));
}

#[test]
fn reload_rejects_a_foreign_key_and_garbage() {
    let a = SandboxCa::generate("sbx-a").unwrap();
    let b = SandboxCa::generate("sbx-b").unwrap();
    assert!(matches!(
        SandboxCa::from_pem("sbx-a", a.cert_pem(), &b.key_pem()),
        Err(CaError::Invalid(_))
    ));
    assert!(matches!(
        SandboxCa::from_pem("sbx-a", "not pem", &a.key_pem()),
        Err(CaError::Invalid(_))
    ));
    assert!(matches!(
        SandboxCa::from_pem("sbx-a", a.cert_pem(), "garbage"),
        Err(CaError::Invalid(_))
    ));
}

#[test]
fn key_pem_is_never_in_debug_output() {
    let ca = SandboxCa::generate("sbx-a").unwrap();
    let key = ca.key_pem();
    let body: String = key.lines().nth(1).unwrap().to_string();
    let ic = Interception::new(
        Arc::new(ca),
        UpstreamTrust::from_roots({
            let mut r = RootCertStore::empty();
            r.add(SandboxCa::generate("x").unwrap().cert_der().clone())
                .unwrap();
            r
        })
        .unwrap(),
    )
    .unwrap();
    let dbg = format!("{ic:?} {:?}", ic.ca());
    assert!(!dbg.contains(&body));
}

#[test]
fn one_mint_per_name_under_concurrency_then_cached() {
    let ca = Arc::new(SandboxCa::generate("sbx-a").unwrap());
    let cache = Arc::new(LeafCache::new(ca, 8));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let c = Arc::clone(&cache);
            std::thread::spawn(move || c.get("api.test").unwrap())
        })
        .collect();
    let leaves: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(cache.mints(), 1);
    assert!(leaves.iter().all(|l| Arc::ptr_eq(l, &leaves[0])));
    cache.get("api.test").unwrap();
    assert_eq!(cache.mints(), 1);
}

#[test]
fn cache_is_bounded_and_evicts_oldest() {
    let ca = Arc::new(SandboxCa::generate("sbx-a").unwrap());
    let cache = LeafCache::new(ca, 3);
    for i in 0..5 {
        cache.get(&format!("n{i}.test")).unwrap();
    }
    assert_eq!(cache.len(), 3);
    assert!(cache.cached("n0.test").is_none());
    assert!(cache.cached("n4.test").is_some());
    assert_eq!(cache.mints(), 5);
}
