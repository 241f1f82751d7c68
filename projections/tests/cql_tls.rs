//! TLS to the CQL cluster.
//!
//! One local Cassandra node per test binary whose native port speaks TLS only and requires a
//! client certificate, with a throwaway CA (`parley_localstack::pki`): the node's
//! certificate carries `127.0.0.1` and `localstack.parley.test`. A second CA, which signed
//! nothing the node trusts, stands for "the wrong CA". The node always runs locally, also when `PARLEY_TEST_SCYLLA`
//! names a cluster, because it must trust this test's CA. Without Java the node tests print
//! `skipped: ...` unless `CI` or `PARLEY_REQUIRE_CQL` is set; the bad-file tests need no node.

use std::sync::OnceLock;

use parley_localstack::CassandraNode;
use parley_localstack::pki::{Authority, SERVER_NAME, TestPki};
use parley_projections::{
    ClientCert, ConversationStore, CqlOptions, CqlStore, StoreError, StoreErrorKind, TlsClient,
};

mod support;
use support::{direct, group, log_with, user};

fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| TestPki::new().unwrap())
}

fn client_cert(authority: &Authority) -> ClientCert {
    ClientCert {
        cert_file: authority.client_cert.clone(),
        key_file: authority.client_key.clone(),
    }
}

/// The process-wide TLS node, started on first use; its launcher kills it and deletes its
/// data when this process ends.
fn node() -> Option<&'static CassandraNode> {
    static NODE: OnceLock<Option<CassandraNode>> = OnceLock::new();
    NODE.get_or_init(|| {
        CassandraNode::start_with_or_skip("the CQL TLS tests", Some(&pki().server_tls(true)))
    })
    .as_ref()
}

fn options(contact_point: String, keyspace: &str, tls: Option<TlsClient>) -> CqlOptions {
    let mut options = CqlOptions::new(vec![contact_point], keyspace);
    options.tls = tls;
    options.request_timeout = std::time::Duration::from_secs(10);
    options
}

/// TLS that trusts the node's CA and presents the client certificate it signed.
fn mutual() -> TlsClient {
    let pki = pki();
    TlsClient {
        ca_file: Some(pki.trusted.ca.clone()),
        client_cert: Some(client_cert(&pki.trusted)),
        server_name: None,
    }
}

async fn open_on_node(
    keyspace: &str,
    tls: Option<TlsClient>,
) -> Option<Result<CqlStore, StoreError>> {
    let node = node()?;
    Some(CqlStore::open(&options(node.contact_point(), keyspace, tls)).await)
}

fn refused(result: Result<CqlStore, StoreError>) -> String {
    match result {
        Ok(_) => panic!("the store opened, but the connection should have been refused"),
        Err(e) => {
            assert_eq!(e.kind, StoreErrorKind::Unavailable, "{e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn the_store_runs_over_mutual_tls() {
    let Some(opened) = open_on_node("tls_mutual", Some(mutual())).await else {
        return;
    };
    let store = opened.unwrap();
    let log = log_with(5);
    store.apply(&log).await.unwrap();

    assert_eq!(store.position().await.unwrap(), log.len() as u64);
    let history = store.history(direct(), None, 100).await.unwrap();
    assert_eq!(history.messages.len(), 5);
    assert!(!history.has_more);
    let members = store.members(group()).await.unwrap();
    assert_eq!(members.len(), 2);
    let inbox = store.inbox(&user("alice"), None, 10).await.unwrap();
    assert_eq!(inbox.len(), 2);
    store.check().await.unwrap();
}

#[tokio::test]
async fn a_configured_server_name_is_what_the_node_certificate_must_carry() {
    let named = |name: &str| TlsClient {
        server_name: Some(name.to_owned()),
        ..mutual()
    };
    let Some(opened) = open_on_node("tls_named", Some(named(SERVER_NAME))).await else {
        return;
    };
    opened.unwrap();

    let error = refused(
        open_on_node("tls_misnamed", Some(named("other.parley.test")))
            .await
            .unwrap(),
    );
    assert!(error.contains("certificate"), "{error}");
}

#[tokio::test]
async fn a_node_whose_certificate_another_ca_signed_is_refused() {
    let tls = TlsClient {
        ca_file: Some(pki().foreign.ca.clone()),
        ..mutual()
    };
    let Some(opened) = open_on_node("tls_wrong_ca", Some(tls)).await else {
        return;
    };
    let error = refused(opened);
    assert!(error.contains("certificate"), "{error}");
}

#[tokio::test]
async fn the_node_refuses_a_client_without_a_certificate_it_trusts() {
    let without = TlsClient {
        client_cert: None,
        ..mutual()
    };
    let Some(opened) = open_on_node("tls_no_client_cert", Some(without)).await else {
        return;
    };
    refused(opened);

    let foreign_client = TlsClient {
        client_cert: Some(client_cert(&pki().foreign)),
        ..mutual()
    };
    refused(
        open_on_node("tls_foreign_client", Some(foreign_client))
            .await
            .unwrap(),
    );
}

#[tokio::test]
async fn a_plaintext_client_is_refused_by_a_tls_node() {
    let Some(opened) = open_on_node("tls_plaintext", None).await else {
        return;
    };
    refused(opened);
}

// --- files that cannot work: refused before any connection, as configuration errors ---

async fn config_error(tls: TlsClient) -> String {
    // Nothing listens on port 1: only an error found before connecting comes back as
    // `Config`.
    match CqlStore::open(&options("127.0.0.1:1".into(), "unused", Some(tls))).await {
        Ok(_) => panic!("the store opened with unusable TLS files"),
        Err(e) => {
            assert_eq!(e.kind, StoreErrorKind::Config, "{e}");
            e.to_string()
        }
    }
}

#[tokio::test]
async fn a_missing_ca_file_is_a_configuration_error() {
    let missing = pki().path("no-such-ca.pem");
    let error = config_error(TlsClient {
        ca_file: Some(missing.clone()),
        ..mutual()
    })
    .await;
    assert!(error.contains(&missing.display().to_string()), "{error}");
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_a_configuration_error() {
    let empty = pki().path("not-a-ca.pem");
    std::fs::write(&empty, "this is not PEM\n").unwrap();
    let error = config_error(TlsClient {
        ca_file: Some(empty),
        ..mutual()
    })
    .await;
    assert!(error.contains("no PEM certificate"), "{error}");
}

#[tokio::test]
async fn a_key_file_without_a_key_is_a_configuration_error() {
    let pki = pki();
    let error = config_error(TlsClient {
        client_cert: Some(ClientCert {
            cert_file: pki.trusted.client_cert.clone(),
            key_file: pki.trusted.client_cert.clone(),
        }),
        ..mutual()
    })
    .await;
    assert!(error.contains("private key"), "{error}");
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_a_configuration_error() {
    let pki = pki();
    let error = config_error(TlsClient {
        client_cert: Some(ClientCert {
            cert_file: pki.trusted.client_cert.clone(),
            key_file: pki.foreign.client_key.clone(),
        }),
        ..mutual()
    })
    .await;
    assert!(error.contains("client certificate"), "{error}");
}

#[tokio::test]
async fn an_invalid_server_name_is_a_configuration_error() {
    let error = config_error(TlsClient {
        server_name: Some("not a host name".into()),
        ..mutual()
    })
    .await;
    assert!(error.contains("server name"), "{error}");
}
