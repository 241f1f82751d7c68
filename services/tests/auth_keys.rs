//! RS256 and EdDSA tokens verified with the public keys of the operator's JWKS file, chosen
//! by `kid`, and keys rotated by rewriting the file while the gateway runs.
//!
//! The private keys are test-only fixtures (`tests/fixtures/README.md`); the JWKS file is
//! derived from them here, as an operator would publish it.

mod support;

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley_services::unix_millis;
use serde_json::json;
use support::{Client, Platform, eventually, http_get};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

struct TestKey {
    encoding: EncodingKey,
    algorithm: Algorithm,
    kid: &'static str,
}

impl TestKey {
    fn new(fixture: &str, algorithm: Algorithm, kid: &'static str) -> TestKey {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture);
        let der = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let encoding = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_der(&der),
            Algorithm::EdDSA => EncodingKey::from_ed_der(&der),
            other => panic!("no test key for {other:?}"),
        };
        TestKey {
            encoding,
            algorithm,
            kid,
        }
    }

    fn rsa_a() -> TestKey {
        TestKey::new("test-only-rsa-a.der", Algorithm::RS256, "rsa-a")
    }

    fn rsa_b() -> TestKey {
        TestKey::new("test-only-rsa-b.der", Algorithm::RS256, "rsa-b")
    }

    fn ed() -> TestKey {
        TestKey::new("test-only-ed25519.der", Algorithm::EdDSA, "ed-1")
    }

    /// The public half, as the JWKS file lists it.
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.encoding, self.algorithm).unwrap();
        jwk.common.key_id = Some(self.kid.to_owned());
        jwk
    }

    /// A token for `user` signed with this key, its header saying `algorithm` and `kid`.
    fn sign_as(&self, algorithm: Algorithm, kid: &str, user: &str) -> String {
        let now = unix_millis() / 1000;
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.to_owned());
        let claims = json!({"sub": user, "iat": now, "exp": now + 3600});
        jsonwebtoken::encode(&header, &claims, &self.encoding).unwrap()
    }

    fn token(&self, user: &str) -> String {
        self.sign_as(self.algorithm, self.kid, user)
    }
}

/// Replace the key file with `keys`, by rename as an operator's deploy would, so the
/// gateway never reads half a file.
fn publish(path: &Path, keys: &[&TestKey]) {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk()).collect(),
    };
    write_atomically(path, &serde_json::to_vec(&set).unwrap());
}

fn write_atomically(path: &Path, content: &[u8]) {
    let staging = path.with_extension("new");
    std::fs::write(&staging, content).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// A gateway verifying with the test secret and the key file at `keys`.
async fn platform_with_keys(keys: &Path) -> Platform {
    let keys = keys.to_owned();
    Platform::start_with(1, move |c| {
        c.auth.jwks_file = Some(keys);
        c.auth.jwks_poll_secs = 1;
    })
    .await
}

fn with_bearer(platform: &Platform, token: &str) -> tungstenite::handshake::client::Request {
    let mut request = platform.url(0).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The user the gateway welcomed with `token`, or the error code it refused it with.
async fn outcome(platform: &Platform, token: &str) -> Result<String, String> {
    match Client::open(with_bearer(platform, token)).await {
        Ok(mut client) => {
            let welcome = client.next_of(&["welcome"]).await;
            client.close().await;
            Ok(welcome["user"].as_str().unwrap().to_owned())
        }
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            Err(body["code"].as_str().unwrap().to_owned())
        }
        Err(other) => panic!("expected a welcome or an HTTP refusal, got {other}"),
    }
}

fn key_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_eddsa_tokens_are_verified_by_kid_and_forgeries_refused() {
    let (_dir, path) = key_file();
    let (rsa_a, rsa_b, ed) = (TestKey::rsa_a(), TestKey::rsa_b(), TestKey::ed());
    publish(&path, &[&rsa_a, &ed]);
    let platform = platform_with_keys(&path).await;

    assert_eq!(
        outcome(&platform, &rsa_a.token("alice")).await,
        Ok("alice".into())
    );
    assert_eq!(outcome(&platform, &ed.token("bob")).await, Ok("bob".into()));
    // The shared secret still works beside the key file.
    assert_eq!(
        outcome(&platform, &platform.token("carol")).await,
        Ok("carol".into())
    );

    let refusals = [
        ("unknown kid", rsa_b.token("alice")),
        (
            "signed by another key under a known kid",
            rsa_b.sign_as(Algorithm::RS256, "rsa-a", "alice"),
        ),
        (
            "RS256 claimed for the EdDSA key",
            rsa_a.sign_as(Algorithm::RS256, "ed-1", "alice"),
        ),
        (
            "EdDSA claimed for the RSA key",
            ed.sign_as(Algorithm::EdDSA, "rsa-a", "alice"),
        ),
        (
            "tampered claims",
            tampered(&rsa_a.token("alice"), &rsa_a.token("mallory")),
        ),
        (
            "no kid",
            jsonwebtoken::encode(
                &Header::new(Algorithm::RS256),
                &json!({"sub": "alice", "exp": unix_millis() / 1000 + 60}),
                &rsa_a.encoding,
            )
            .unwrap(),
        ),
    ];
    for (case, token) in refusals {
        assert_eq!(
            outcome(&platform, &token).await,
            Err("token_invalid".into()),
            "{case}"
        );
    }
}

/// `token` with its claims taken from `other` (signed by the same key), its signature kept.
fn tampered(token: &str, other: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let claims = other.split('.').nth(1).unwrap();
    format!("{}.{claims}.{}", parts[0], parts[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_by_rewriting_the_file_and_a_broken_file_keeps_the_last_good_keys() {
    let (_dir, path) = key_file();
    let (rsa_a, rsa_b) = (TestKey::rsa_a(), TestKey::rsa_b());
    publish(&path, &[&rsa_a]);
    let platform = platform_with_keys(&path).await;
    assert_eq!(
        outcome(&platform, &rsa_b.token("alice")).await,
        Err("token_invalid".into())
    );

    publish(&path, &[&rsa_a, &rsa_b]);
    eventually(|| async { outcome(&platform, &rsa_b.token("alice")).await.ok() }).await;

    publish(&path, &[&rsa_b]);
    eventually(|| async { outcome(&platform, &rsa_a.token("alice")).await.err() }).await;
    assert_eq!(
        outcome(&platform, &rsa_a.token("alice")).await,
        Err("token_invalid".into())
    );

    write_atomically(&path, b"{\"keys\": [");
    let admin = platform.admin_addresses()[0];
    eventually(|| async {
        let (_, metrics) = http_get(admin, "/metrics").await;
        metrics
            .contains(r#"parley_auth_key_reloads_total{result="error"} 1"#)
            .then_some(())
    })
    .await;
    assert_eq!(
        outcome(&platform, &rsa_b.token("alice")).await,
        Ok("alice".into())
    );
}
