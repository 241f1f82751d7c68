//! `wss://`: the gateway's TLS certificate, served from memory and replaced when its files
//! change, so that a rotated certificate takes effect on the next handshake without a
//! restart. Handshakes in progress and sockets already open keep the certificate they
//! started with.
//!
//! A replacement that cannot be used (a missing file, bad PEM, a key that does not match
//! the certificate) is logged and counted, and the certificate in service stays: a
//! half-written rotation must never leave the gateway without one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

use crate::config::GatewayTlsConfig;
use crate::telemetry;

/// A certificate file that cannot be served; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("gateway.tls: {0}")]
pub struct CertificateError(String);

/// When the files were last seen changed: their modification times and sizes.
type Stamp = [Option<(SystemTime, u64)>; 2];

/// The certificate in service and where it comes from.
#[derive(Debug)]
pub(super) struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files as they were at the last load attempt, good or bad: a bad file is
    /// reported once, not at every check.
    seen: Mutex<Stamp>,
    reload_every: Duration,
}

impl Certificate {
    /// Reads the files once (an error here stops the gateway at start) and makes the
    /// acceptor that serves whatever certificate is current.
    pub(super) fn load(
        config: &GatewayTlsConfig,
    ) -> Result<Option<(TlsAcceptor, Arc<Certificate>)>, CertificateError> {
        let Some((cert_file, key_file)) = config.files() else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = stamp(cert_file, key_file);
        let key = certified_key(cert_file, key_file, &provider)?;
        let certificate = Arc::new(Certificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider: Arc::clone(&provider),
            current: RwLock::new(Arc::new(key)),
            seen: Mutex::new(seen),
            reload_every: Duration::from_secs(config.reload_secs),
        });
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CertificateError(format!("protocol versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        // WebSockets are upgraded HTTP/1.1 requests.
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some((TlsAcceptor::from(Arc::new(server)), certificate)))
    }

    /// Check the files every `reload_secs`, forever; a change loads them again.
    pub(super) async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.reload_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reload_if_changed();
        }
    }

    fn reload_if_changed(&self) {
        let now = stamp(&self.cert_file, &self.key_file);
        {
            let mut seen = self.seen.lock().expect("stamp lock poisoned");
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match certified_key(&self.cert_file, &self.key_file, &self.provider) {
            Ok(key) => {
                *self.current.write().expect("certificate lock poisoned") = Arc::new(key);
                metrics::counter!(telemetry::GATEWAY_TLS_RELOADS_TOTAL, "result" => "reloaded")
                    .increment(1);
                info!(file = %self.cert_file.display(), "gateway certificate reloaded");
            }
            Err(e) => {
                metrics::counter!(telemetry::GATEWAY_TLS_RELOADS_TOTAL, "result" => "failed")
                    .increment(1);
                error!(error = %e, "the changed certificate cannot be used; the previous one stays in service");
            }
        }
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().expect("certificate lock poisoned"),
        ))
    }
}

fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    [cert_file, key_file].map(|path| {
        let metadata = std::fs::metadata(path).ok()?;
        Some((metadata.modified().ok()?, metadata.len()))
    })
}

/// The chain and key in the files, checked to belong together.
fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertificateError> {
    let chain = parley_projections::tls::certificates_in(cert_file)
        .map_err(|e| CertificateError(e.message().to_owned()))?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        CertificateError(format!(
            "key file {}: no usable PEM private key ({e})",
            key_file.display()
        ))
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        CertificateError(format!(
            "certificate {} with key {}: {e}",
            cert_file.display(),
            key_file.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use parley_localstack::pki::TestPki;

    use super::*;

    fn config(cert_file: &Path, key_file: &Path) -> GatewayTlsConfig {
        GatewayTlsConfig {
            enabled: true,
            cert_file: Some(cert_file.to_owned()),
            key_file: Some(key_file.to_owned()),
            reload_secs: 1,
        }
    }

    fn refused(config: &GatewayTlsConfig) -> String {
        match Certificate::load(config) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{config:?} was accepted"),
        }
    }

    #[test]
    fn files_that_cannot_serve_are_refused_at_start_naming_the_file() {
        let pki = TestPki::new().unwrap();
        let missing = pki.path("missing-key.pem");
        let text = refused(&config(&pki.server_cert, &missing));
        assert!(
            text.contains("key file") && text.contains("missing-key.pem"),
            "{text}"
        );

        let garbage = pki.path("garbage.pem");
        std::fs::write(&garbage, "not PEM at all").unwrap();
        let text = refused(&config(&garbage, &pki.server_key));
        assert!(
            text.contains("garbage.pem") && text.contains("no PEM certificate"),
            "{text}"
        );

        // A key that is not the certificate's.
        let text = refused(&config(&pki.server_cert, &pki.trusted.client_key));
        assert!(text.contains("with key"), "{text}");

        assert!(
            Certificate::load(&GatewayTlsConfig::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_changed_file_is_loaded_and_a_bad_one_keeps_the_certificate_in_service() {
        let (first, second) = (TestPki::new().unwrap(), TestPki::new().unwrap());
        let cert_file = first.path("gw.pem");
        let key_file = first.path("gw-key.pem");
        std::fs::copy(&first.server_cert, &cert_file).unwrap();
        std::fs::copy(&first.server_key, &key_file).unwrap();
        let (_, certificate) = Certificate::load(&config(&cert_file, &key_file))
            .unwrap()
            .unwrap();
        let served = || certificate.current.read().unwrap().cert[0].clone();
        let original = served();

        std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
        certificate.reload_if_changed();
        assert_eq!(
            served(),
            original,
            "a bad file keeps the certificate in service"
        );

        std::fs::copy(&second.server_cert, &cert_file).unwrap();
        std::fs::copy(&second.server_key, &key_file).unwrap();
        certificate.reload_if_changed();
        assert_ne!(served(), original, "the new certificate is served");
    }
}
