//! The per-sandbox CA and the leaf certificates it mints.
//!
//! * CA: ECDSA P-256, `basicConstraints CA:TRUE, pathLenConstraint 0`,
//!   keyCertSign + cRLSign, subject key id = SHA-256 of its public key.
//!   Backdated by [`BACKDATE`] so a guest restored from an old snapshot with
//!   a stale clock still accepts it; valid for [`CA_LIFETIME`].
//! * Leaves: SAN = the A-label name, serverAuth only, digitalSignature,
//!   authority key id of the CA, a random 128-bit serial, backdated by
//!   [`LEAF_BACKDATE`] and valid for [`LEAF_LIFETIME`] after minting
//!   (under a year in all). All leaves of a sandbox share
//!   one P-256 key generated in memory when the CA is loaded (minting is
//!   then one signature); neither key ever enters the sandbox.
//!
//! The CA's key is persisted by the caller ([`SandboxCa::key_pem`]) and
//! reloaded with [`SandboxCa::from_pem`], which checks that key and
//! certificate belong together.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use time::OffsetDateTime;

/// How far the CA's validity starts in the past (a restored guest's clock
/// may lag by the snapshot's age).
pub const BACKDATE: Duration = Duration::from_secs(400 * 24 * 3600);
/// CA validity after creation.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far a leaf's validity starts in the past.
pub const LEAF_BACKDATE: Duration = Duration::from_secs(180 * 24 * 3600);
/// Leaf validity after minting; with [`LEAF_BACKDATE`] a leaf is valid for
/// 360 days in all, under the one-year bound clients apply.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(180 * 24 * 3600);
/// A cached leaf older than this is minted again.
pub const LEAF_REFRESH: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default bound on cached leaves per sandbox.
pub const DEFAULT_LEAF_CAPACITY: usize = 1024;

/// Why a CA could not be created or loaded, or a leaf minted.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Key generation or certificate signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The stored key or certificate is not what was expected.
    #[error("stored CA is invalid: {0}")]
    Invalid(&'static str),
    /// rustls refused the generated key.
    #[error("signing key rejected: {0}")]
    Key(#[from] rustls::Error),
}

/// One sandbox's certificate authority.
pub struct SandboxCa {
    label: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn SigningKey>,
}

/// Minted leaves of one sandbox: bounded, one mint per name at a time.
pub struct LeafCache {
    ca: Arc<SandboxCa>,
    capacity: usize,
    inner: Mutex<CacheInner>,
    mints: AtomicU64,
}

#[derive(Default)]
struct CacheInner {
    slots: HashMap<String, Arc<Slot>>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<String>,
}

/// One name's leaf; its mutex is held while the leaf is minted, so other
/// connections for the same name wait for that mint instead of repeating it.
#[derive(Default)]
struct Slot {
    leaf: Mutex<Option<(Arc<CertifiedKey>, Instant)>>,
}

// === impl SandboxCa ===

impl SandboxCa {
    /// A new CA for the sandbox `label` (its id; it appears in the subject).
    pub fn generate(label: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(label);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Self::assemble(label, cert.pem(), cert.der().clone(), key)
    }

    /// Reloads a CA from its stored certificate and key (both PEM).
    pub fn from_pem(label: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| CaError::Invalid("key is not PEM"))?;
        if !key.is_compatible(&PKCS_ECDSA_P256_SHA256) {
            return Err(CaError::Invalid("key is not ECDSA P-256"));
        }
        let der = pem_certificate(cert_pem).ok_or(CaError::Invalid("certificate is not PEM"))?;
        // The certificate must carry this key's public key (its SPKI).
        if !contains(&der, &rcgen::PublicKeyData::subject_public_key_info(&key)) {
            return Err(CaError::Invalid("key does not match the certificate"));
        }
        Self::assemble(label, cert_pem.to_string(), der, key)
    }

    fn assemble(
        label: &str,
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der)?;
        Ok(Self {
            label: label.to_string(),
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(label), key),
            leaf_key,
            leaf_signer,
        })
    }

    /// The sandbox this CA belongs to.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The CA certificate, PEM (what the sandbox trusts).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PKCS#8 PEM, for the caller to store (0600).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Mints a leaf for `name` (an A-label host name), signed now.
    pub fn mint(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&self.leaf_key, &self.issuer)?;
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            Arc::clone(&self.leaf_signer),
        )))
    }
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// The CA's identity and constraints; the same for creation and reload, so
/// the issuer name and key id of leaves always match the stored certificate.
fn ca_params(label: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tollgate");
    dn.push(DnType::CommonName, format!("tollgate sandbox CA {label}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A positive random 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

/// The first CERTIFICATE block of a PEM text.
fn pem_certificate(text: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(text.as_bytes()).next()?.ok()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

// === impl LeafCache ===

impl LeafCache {
    /// A cache of at most `capacity` leaves (at least 1) minted by `ca`.
    pub fn new(ca: Arc<SandboxCa>, capacity: usize) -> Self {
        Self {
            ca,
            capacity: capacity.max(1),
            inner: Mutex::new(CacheInner::default()),
            mints: AtomicU64::new(0),
        }
    }

    /// The CA the leaves come from.
    pub fn ca(&self) -> &Arc<SandboxCa> {
        &self.ca
    }

    /// The leaf for `name`: cached, or minted now (once, however many
    /// connections ask at the same time).
    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let slot = self.slot(name);
        let mut leaf = slot.leaf.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cert, at)) = leaf.as_ref() {
            if at.elapsed() < LEAF_REFRESH {
                return Ok(Arc::clone(cert));
            }
        }
        let cert = self.ca.mint(name)?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        *leaf = Some((Arc::clone(&cert), Instant::now()));
        Ok(cert)
    }

    /// The cached leaf for `name`, without minting.
    pub fn cached(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let slot = {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(inner.slots.get(name)?)
        };
        let leaf = slot.leaf.lock().unwrap_or_else(|p| p.into_inner());
        leaf.as_ref().map(|(c, _)| Arc::clone(c))
    }

    /// Leaves minted since creation.
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// Names cached now.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .slots
            .len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = inner.slots.get(name) {
            return Arc::clone(s);
        }
        while inner.slots.len() >= self.capacity {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.slots.remove(&old);
        }
        let slot = Arc::new(Slot::default());
        inner.slots.insert(name.to_string(), Arc::clone(&slot));
        inner.order.push_back(name.to_string());
        slot
    }
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("ca", &self.ca.label)
            .field("len", &self.len())
            .field("mints", &self.mints())
            .finish()
    }
}
