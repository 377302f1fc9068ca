//! TLS for the shared HTTP client (https webhooks): rustls on the ring
//! provider, trusting Mozilla's roots (webpki-roots, compiled in) and any
//! extra CA certificates an operator names (a private CA, or a test's).

use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
pub(crate) use tokio_rustls::TlsConnector;

/// A connector trusting Mozilla's roots plus the PEM certificates in
/// `extra_ca` (a file path), if given.
pub(crate) fn connector(extra_ca: Option<&str>) -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("{path}: not a usable CA certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{path}: no PEM certificate in it"));
        }
    }
    // ring, deprecated in rustls 0.23.48 for lacking post-quantum key
    // exchange: its replacement (aws-lc-rs) needs cmake and a C build of
    // AWS-LC on every fresh machine; a webhook's signed body is not a
    // long-term secret.
    #[allow(deprecated)]
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
