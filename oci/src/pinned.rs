//! Trusting a hub by its key: the hub's CA key is its Ed25519 signing key,
//! and a join token (or an enrolled agent's state) pins that key's
//! fingerprint. [`client_config`] accepts a server whose chain ends at a CA
//! certificate with exactly that key (checked as a real X.509 chain, names
//! and all, with the CA as its only root), or else, for brokers with their
//! own PKI, the given roots.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// The DER of an Ed25519 SubjectPublicKeyInfo, up to the key (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Whether the certificate's own public key (its SubjectPublicKeyInfo, not
/// any other bytes of it) is the Ed25519 key `key`.
pub fn holds_key(cert: &CertificateDer<'_>, key: &[u8; 32]) -> bool {
    let Ok(anchor) = webpki::anchor_from_trusted_cert(cert) else { return false };
    let spki: &[u8] = anchor.subject_public_key_info.as_ref();
    let mut full = ED25519_SPKI_PREFIX.to_vec();
    full.extend_from_slice(key);
    // With or without the outer SEQUENCE tag, depending on the encoding kept.
    spki == full.as_slice() || spki == &full[2..]
}

/// The Ed25519 key of a certificate, if that is what it carries.
fn ed25519_key(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let anchor = webpki::anchor_from_trusted_cert(cert).ok()?;
    let spki: &[u8] = anchor.subject_public_key_info.as_ref();
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..]).or_else(|| spki.strip_prefix(&ED25519_SPKI_PREFIX[2..]))?;
    key.try_into().ok()
}

fn fingerprint(key: &[u8; 32]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    edge_api::hex::encode(&d.as_ref()[..16])
}

/// Where the roots for a server that is not the hub come from; loaded at
/// the first such server, not before (the system's roots are most of a
/// TLS client's memory, and a device that talks only to its hub never
/// needs them).
pub type LoadRoots = Box<dyn Fn() -> Result<RootCertStore, String> + Send + Sync>;

struct HubPinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    load: Option<LoadRoots>,
    fallback: std::sync::OnceLock<Result<Arc<WebPkiServerVerifier>, String>>,
}

impl std::fmt::Debug for HubPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubPinned").field("fingerprint", &self.fingerprint).finish()
    }
}

impl HubPinned {
    fn fallback(&self) -> Option<Result<&Arc<WebPkiServerVerifier>, String>> {
        let load = self.load.as_ref()?;
        let built = self.fallback.get_or_init(|| {
            let roots = load()?;
            if roots.is_empty() {
                return Err("no CA certificates to check it against".into());
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| e.to_string())
        });
        Some(built.as_ref().map_err(Clone::clone))
    }
}

impl ServerCertVerifier for HubPinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let hub_ca = intermediates
            .iter()
            .find(|c| ed25519_key(c).is_some_and(|k| crate::hex_ct_eq(&fingerprint(&k), &self.fingerprint)));
        if let Some(ca) = hub_ca {
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone().into_owned()).map_err(|e| Error::General(format!("the hub's CA: {e}")))?;
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| Error::General(e.to_string()))?;
            return verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now);
        }
        let not_hub = format!(
            "the server's certificate is not from the hub whose key the join token pins ({})",
            self.fingerprint
        );
        match self.fallback() {
            Some(Ok(v)) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| Error::General(format!("{not_hub}, nor trusted by the CA certificates given ({e})"))),
            Some(Err(e)) => {
                Err(Error::General(format!("{not_hub}, and the other CA certificates cannot be used: {e}")))
            }
            None => Err(Error::General(not_hub)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration that trusts the hub whose key has `fingerprint`
/// (32 hex digits, as a join token carries), and, if given, a broker or
/// server certified by the roots `fallback` loads (an external broker's own
/// PKI, an operator's certificate for the hub), loaded only when needed.
pub fn client_config(fingerprint: &str, fallback: Option<LoadRoots>) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = HubPinned {
        fingerprint: fingerprint.to_ascii_lowercase(),
        provider: provider.clone(),
        load: fallback,
        fallback: std::sync::OnceLock::new(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}
