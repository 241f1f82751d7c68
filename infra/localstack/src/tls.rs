//! TLS for a local server, in the one shape nats-server, redis-server and Cassandra all take.

use std::path::PathBuf;

/// A server's certificate and key, and the CA its clients' certificates must chain to.
/// [`pki::TestPki`](crate::pki) (feature `pki`) makes a set for tests.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// PEM private key of the leaf, PKCS#8, unencrypted.
    pub key: PathBuf,
    /// PEM file of the CAs a client certificate must chain to.
    pub client_ca: PathBuf,
    /// Whether clients must present a certificate (mutual TLS).
    pub require_client_cert: bool,
}
