//! TLS to the CQL cluster: the roots the nodes' certificates must chain to, the certificate
//! this client presents when the cluster asks for one, and the name the nodes' certificates
//! must carry.
//!
//! Everything is read and checked when the store opens, so a missing or malformed file is a
//! [`StoreErrorKind::Config`] error at start (retrying cannot fix it), never a handshake
//! failure later. The `ring` provider is named explicitly: the driver's TLS dependency also
//! compiles in `aws-lc-rs`, and with two providers built in rustls has no default to fall
//! back on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::store::{StoreError, StoreErrorKind};

/// How connections to every node are encrypted and authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CqlTls {
    /// PEM file of the CA certificates the nodes' certificates must chain to. `None`: the
    /// operating system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate this client presents, for clusters that require client certificates
    /// (`require_client_auth`).
    pub client_cert: Option<ClientCert>,
    /// The DNS name every node's certificate must carry. `None`: each node's certificate must
    /// carry the IP address the driver connects to (the driver reaches nodes by the addresses
    /// the cluster reports, never by name).
    pub server_name: Option<String>,
}

/// A PEM certificate chain (leaf first) and the PEM private key that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Whether `name` can be a [`CqlTls::server_name`]: a DNS name (or an IP address literal).
pub fn is_valid_server_name(name: &str) -> bool {
    ServerName::try_from(name).is_ok()
}

fn config_error(message: String) -> StoreError {
    StoreError::new(StoreErrorKind::Config, message)
}

impl CqlTls {
    /// The rustls configuration for the driver, with every file read and checked.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(match &self.ca_file {
            Some(path) => roots_from(path)?,
            None => system_roots()?,
        });
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| config_error(format!("TLS trust roots: {e}")))?;
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(format!("TLS protocol versions: {e}")))?;
        let builder = match &self.server_name {
            None => builder.with_webpki_verifier(webpki),
            Some(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| {
                    config_error(format!("TLS server name {name:?} is not a valid name: {e}"))
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
                    config_error(format!(
                        "TLS client key {}: no usable PEM private key ({e})",
                        client.key_file.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    config_error(format!(
                        "TLS client certificate {} with key {}: {e}",
                        client.cert_file.display(),
                        client.key_file.display()
                    ))
                })
            }
        }
    }
}

/// Every certificate in a PEM file; a file with none is an error, not an empty trust list.
fn certificates_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let unreadable = |e: rustls::pki_types::pem::Error| {
        config_error(format!("TLS certificate file {}: {e}", path.display()))
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    if certificates.is_empty() {
        return Err(config_error(format!(
            "TLS certificate file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

fn roots_from(path: &Path) -> Result<RootCertStore, StoreError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates_in(path)? {
        roots.add(certificate).map_err(|e| {
            config_error(format!("TLS CA file {}: unusable CA: {e}", path.display()))
        })?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, StoreError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(config_error(format!(
            "TLS: no trusted CA certificates found on this system ({}); set the CA file",
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
