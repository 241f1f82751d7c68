//! How Parley connects as a TLS client, to the CQL cluster, NATS and Redis alike: the roots
//! the server's certificate must chain to, the certificate this client presents when the
//! server asks for one, and optionally the name the server's certificate must carry.
//!
//! Every file is read and checked up front ([`TlsClient::client_config`]), so a missing or
//! malformed file is an error at start that names the file (retrying cannot fix it), never
//! a handshake failure later. The crypto provider is `ring`, named explicitly: the CQL
//! driver's TLS dependency also compiles in `aws-lc-rs`, and with two providers built in
//! rustls has no default to fall back on ([`install_process_provider`] sets one for the
//! clients that build their own configuration).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::store::{StoreError, StoreErrorKind};

/// A TLS file or setting that cannot work; the message names the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

impl TlsError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        TlsError(message.into())
    }

    /// What is wrong, naming the file, without the `TLS:` prefix.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl From<TlsError> for StoreError {
    fn from(e: TlsError) -> Self {
        StoreError::new(StoreErrorKind::Config, e.to_string())
    }
}

/// How connections to a server are encrypted and authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClient {
    /// PEM file of the CA certificates the server's certificate must chain to. `None`: the
    /// operating system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate this client presents, for servers that require client certificates.
    pub client_cert: Option<ClientCert>,
    /// The DNS name the server's certificate must carry, instead of the address connected
    /// to. The CQL driver reaches nodes by the IP addresses the cluster reports, never by
    /// name, so this is how a cluster whose certificates carry a name is verified.
    pub server_name: Option<String>,
}

/// A PEM certificate chain (leaf first) and the PEM private key that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Whether `name` can be a [`TlsClient::server_name`]: a DNS name (or an IP address literal).
pub fn is_valid_server_name(name: &str) -> bool {
    ServerName::try_from(name).is_ok()
}

/// Makes `ring` the process's rustls crypto provider, for clients that build their TLS
/// configuration from the process default (async-nats for `tls://` URLs given no
/// configuration, the redis client always). Idempotent.
pub fn install_process_provider() {
    // An error means a provider is installed already (by an earlier call); it stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsClient {
    /// The rustls configuration, with every file read and checked.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(match &self.ca_file {
            Some(path) => roots_from(path)?,
            None => system_roots()?,
        });
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| TlsError(format!("trust roots: {e}")))?;
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("protocol versions: {e}")))?;
        let builder = match &self.server_name {
            None => builder.with_webpki_verifier(webpki),
            Some(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| {
                    TlsError(format!("server name {name:?} is not a valid name: {e}"))
                })?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NamedServerVerifier {
                        webpki,
                        name,
                    }))
            }
        };
        match &self.client_cert {
            None => Ok(builder.with_no_client_auth()),
            Some(client) => {
                let chain = certificates_in(&client.cert_file)?;
                let key = PrivateKeyDer::from_pem_file(&client.key_file).map_err(|e| {
                    TlsError(format!(
                        "client key {}: no usable PEM private key ({e})",
                        client.key_file.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    TlsError(format!(
                        "client certificate {} with key {}: {e}",
                        client.cert_file.display(),
                        client.key_file.display()
                    ))
                })
            }
        }
    }
}

/// A file's bytes, for clients that take PEM rather than a configuration.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("{}: {e}", path.display())))
}

/// Every certificate in a PEM file; a file with none is an error, not an empty trust list.
/// The gateway reads its own serving chain with it too.
pub fn certificates_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        TlsError(format!("certificate file {}: {e}", path.display()))
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certificates.is_empty() {
        return Err(TlsError(format!(
            "certificate file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates_in(path)? {
        roots
            .add(certificate)
            .map_err(|e| TlsError(format!("CA file {}: unusable CA: {e}", path.display())))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError(format!(
            "no trusted CA certificates found on this system ({}); set the CA file",
            errors.join("; ")
        )));
    }
    Ok(roots)
}

/// The usual WebPKI verification, except that the certificate must carry the configured
/// name rather than the IP address the driver connected to.
#[derive(Debug)]
struct NamedServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _connected_to: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_that_use_the_process_default_find_one_once_installed() {
        super::install_process_provider();
        super::install_process_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        // What async-nats and redis do; it panics without a process default, because two
        // providers are compiled in.
        drop(rustls::ClientConfig::builder());
    }
}
