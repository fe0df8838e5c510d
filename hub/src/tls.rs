//! TLS for the hub's API and its embedded MQTT broker.
//!
//! The hub is its own certificate authority, and the CA's key **is the
//! hub's Ed25519 signing key**: a join token, which pins that key's
//! fingerprint, therefore pins the CA too, and a device can check the hub's
//! certificate on its very first connection without being given a CA file.
//! The CA certificate is written to `DATA_DIR/tls/ca.crt` for `edgectl` and
//! browsers; the server certificate (ECDSA P-256, signed by the CA) is made
//! anew at every start for the names the hub is reached by. An operator's
//! own certificate and key (`--tls-cert`, `--tls-key`) replace both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// What a hub serves TLS with.
pub struct HubTls {
    pub server: Arc<rustls::ServerConfig>,
    /// Where the CA certificate clients should trust is (PEM).
    pub ca_path: PathBuf,
    /// A client configuration that trusts exactly that CA (the hub's own
    /// session with its embedded broker).
    pub client: Arc<rustls::ClientConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The names a hub on this machine is reached by, plus `extra`.
pub fn default_names(extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_ascii_lowercase();
    if !host.is_empty() {
        names.push(host);
    }
    for n in extra {
        if !n.is_empty() && !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// The CA certificate for the hub key (the same bytes for the same key:
/// Ed25519 signatures and the parameters are deterministic).
fn ca(key_pkcs8: &[u8], fingerprint: &str) -> anyhow::Result<(CertificateParams, KeyPair, String)> {
    let key =
        KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()), &rcgen::PKCS_ED25519)
            .context("the hub key cannot sign certificates")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edge");
    dn.push(DnType::CommonName, format!("edge hub {fingerprint}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok((params, key, cert.pem()))
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    crate::write_private(path, contents)
}

/// Loads the operator's certificate chain and key, or makes the hub's own.
pub fn load_or_create(
    dir: &Path,
    key_pkcs8: &[u8],
    fingerprint: &str,
    names: &[String],
    given: Option<(&Path, &Path)>,
) -> anyhow::Result<HubTls> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (chain, key, ca_path): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, PathBuf) = match given {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key_pem = std::fs::read(key).with_context(|| format!("cannot read --tls-key {}", key.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| anyhow::anyhow!("--tls-key {} holds no PEM private key: {e}", key.display()))?;
            // The last certificate of the chain is what clients must trust.
            (chain, key, cert.to_path_buf())
        }
        None => {
            let (ca_params, ca_key, ca_pem) = ca(key_pkcs8, fingerprint)?;
            let ca_path = dir.join("ca.crt");
            if std::fs::read_to_string(&ca_path).ok().as_deref() != Some(ca_pem.as_str()) {
                write_private(&ca_path, ca_pem.as_bytes())?;
                use std::os::unix::fs::PermissionsExt;
                // Public: operators copy it to their machines.
                std::fs::set_permissions(&ca_path, std::fs::Permissions::from_mode(0o644))
                    .with_context(|| format!("cannot make {} readable", ca_path.display()))?;
            }
            let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(names.to_vec()).context("a TLS name is not valid")?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "edge hub");
            params.distinguished_name = dn;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf = params.signed_by(&leaf_key, &issuer)?;
            let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("the CA certificate just made is not PEM: {e}"))?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
            (vec![leaf.der().clone(), ca_der], key, ca_path)
        }
    };
    let ca_der = chain.last().cloned().context("the certificate chain is empty")?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not belong together")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der).context("the CA certificate cannot be trusted as a root")?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(HubTls { server: Arc::new(server), ca_path, client: Arc::new(client) })
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read --tls-cert {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--tls-cert {} is not PEM: {e}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "--tls-cert {} holds no certificate", path.display());
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_api::keys::SigningKey;

    #[test]
    fn the_ca_is_the_hub_key_and_the_same_at_every_start() {
        let key = SigningKey::generate().unwrap();
        let fp = key.public().fingerprint();
        let (_, _, a) = ca(key.pkcs8(), &fp).unwrap();
        let (_, _, b) = ca(key.pkcs8(), &fp).unwrap();
        assert_eq!(a, b, "deterministic, so clients that pinned it keep working");
        let der = CertificateDer::from_pem_slice(a.as_bytes()).unwrap();
        assert!(edge_oci::pinned::holds_key(&der, &key.public().0), "the CA certificate carries the hub's public key");
        let other = SigningKey::generate().unwrap();
        assert!(!edge_oci::pinned::holds_key(&der, &other.public().0));
    }
}
