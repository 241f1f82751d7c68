//! Token verification at the WebSocket upgrade, and minting for development.
//!
//! Tokens are JWTs issued by the embedding application's backend: HS256 with the shared
//! secret (`auth.secret`), or RS256 / EdDSA with a private key whose public half is in the
//! operator's JWKS file (`auth.jwks_file`), chosen by the token's `kid`. `sub` is the user
//! id, `exp` is required. Browsers cannot set headers on a WebSocket, so the token is
//! accepted from `Authorization: Bearer …` or from the `access_token` query parameter; the
//! gateway never logs either.
//!
//! The key file is re-read when it changes, so keys rotate without a restart: publish the
//! new key, start signing with it, drop the old one once its tokens have expired.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parley_events::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::config::{AuthConfig, Secret};
use crate::telemetry;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The token's id, which `parley revoke --token` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Why a token was refused; each maps to a stable client error code.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no token presented")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token invalid: {0}")]
    Invalid(String),
    #[error("token revoked")]
    Revoked,
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::TokenMissing,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid(_) => ErrorCode::TokenInvalid,
            AuthError::Revoked => ErrorCode::TokenRevoked,
        }
    }
}

/// Why a JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a JWKS document: {cause}")]
    Parse {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: {problem}")]
    Key { path: PathBuf, problem: String },
}

/// The public keys of a JWKS file by `kid`, each with the one algorithm it verifies.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, (Algorithm, DecodingKey)>,
}

impl KeySet {
    /// Read and check `path`: every key an RSA (RS256) or Ed25519 (EdDSA) public key with a
    /// unique `kid`, so that a file the gateway would partly ignore is refused whole.
    fn load(path: &Path) -> Result<KeySet, KeysError> {
        let text = std::fs::read(path).map_err(|cause| KeysError::Read {
            path: path.to_owned(),
            cause,
        })?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|cause| KeysError::Parse {
            path: path.to_owned(),
            cause,
        })?;
        let problem = |problem: String| KeysError::Key {
            path: path.to_owned(),
            problem,
        };
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| problem("every key needs a kid".into()))?;
            let algorithm = key_algorithm(jwk).ok_or_else(|| {
                problem(format!(
                    "key {kid:?}: only RSA keys for RS256 and Ed25519 keys for EdDSA are accepted"
                ))
            })?;
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| problem(format!("key {kid:?}: {e}")))?;
            if keys.insert(kid.clone(), (algorithm, key)).is_some() {
                return Err(problem(format!("kid {kid:?} names two keys")));
            }
        }
        Ok(KeySet { keys })
    }
}

/// The algorithm `jwk` verifies: its `alg` when given, else the one its key type implies.
fn key_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    match jwk.common.key_algorithm {
        None => Some(implied),
        Some(alg) if alg == KeyAlgorithm::from(implied) => Some(implied),
        Some(_) => None,
    }
}

/// The JWKS file's keys as last read successfully, and how to tell that the file changed.
struct KeyFile {
    path: PathBuf,
    keys: RwLock<Arc<KeySet>>,
}

/// What identifies one version of the key file: rewriting it changes one or the other.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Verifies tokens with the configured secret and key file.
pub struct Verifier {
    secret: Option<DecodingKey>,
    key_file: Option<KeyFile>,
    config: AuthConfig,
}

impl Verifier {
    /// A verifier for what `config` configures: `None` when it configures neither a secret
    /// nor a key file.
    pub fn new(config: &AuthConfig) -> Result<Option<Verifier>, KeysError> {
        let key_file = match &config.jwks_file {
            Some(path) => Some(KeyFile {
                keys: RwLock::new(Arc::new(KeySet::load(path)?)),
                path: path.clone(),
            }),
            None => None,
        };
        if config.secret.is_none() && key_file.is_none() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            secret: config
                .secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.expose().as_bytes())),
            key_file,
            config: config.clone(),
        }))
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// The user a token names, if it is valid now.
    pub fn verify(&self, token: &str) -> Result<(UserId, Claims), AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let invalid = |reason: &str| AuthError::Invalid(reason.to_owned());
        let key_set;
        let key = match header.alg {
            Algorithm::HS256 => self
                .secret
                .as_ref()
                .ok_or_else(|| invalid("HS256 tokens are not accepted here"))?,
            Algorithm::RS256 | Algorithm::EdDSA => {
                let file = self
                    .key_file
                    .as_ref()
                    .ok_or_else(|| invalid("only HS256 tokens are accepted here"))?;
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| invalid("an RS256 or EdDSA token needs a kid"))?;
                key_set = Arc::clone(&file.keys.read().expect("key set lock"));
                match key_set.keys.get(kid) {
                    Some((algorithm, key)) if *algorithm == header.alg => key,
                    Some(_) => return Err(invalid("the token's algorithm is not its key's")),
                    None => return Err(invalid("unknown kid")),
                }
            }
            _ => return Err(invalid("unsupported algorithm")),
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation(header.alg))
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })?;
        let user = UserId::parse(data.claims.sub.clone())
            .map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok((user, data.claims))
    }

    /// Re-read the key file whenever it changes, checking every `period`; runs until
    /// dropped. A file that cannot be read or used keeps the last good keys in force: a
    /// botched rotation must not lock every user out.
    pub async fn watch_key_file(&self, period: Duration) {
        let Some(file) = &self.key_file else {
            return;
        };
        let mut seen = file_stamp(&file.path);
        loop {
            tokio::time::sleep(period).await;
            let stamp = file_stamp(&file.path);
            if stamp == seen {
                continue;
            }
            seen = stamp;
            match KeySet::load(&file.path) {
                Ok(keys) => {
                    info!(keys = keys.keys.len(), "reloaded the JWKS file");
                    *file.keys.write().expect("key set lock") = Arc::new(keys);
                    metrics::counter!(telemetry::AUTH_KEY_RELOADS_TOTAL, "result" => "ok")
                        .increment(1);
                }
                Err(e) => {
                    error!(error = %e, "keeping the previous keys: the JWKS file is unusable");
                    metrics::counter!(telemetry::AUTH_KEY_RELOADS_TOTAL, "result" => "error")
                        .increment(1);
                }
            }
        }
    }
}

/// Check that `path` is a JWKS file the gateway can use, for configuration validation.
pub fn check_key_file(path: &Path) -> Result<(), KeysError> {
    KeySet::load(path).map(drop)
}

/// Sign a token for `user` valid for `ttl_secs` from `now_secs`: for development and tests;
/// production tokens come from the embedding application's backend.
pub fn mint(secret: &Secret, user: &UserId, now_secs: u64, ttl_secs: u64) -> String {
    let claims = Claims {
        sub: user.as_str().to_owned(),
        exp: now_secs + ttl_secs,
        iat: Some(now_secs),
        iss: None,
        aud: None,
        jti: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("HS256 signing with a byte secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("0123456789abcdef0123456789abcdef")
    }

    fn verifier(config: AuthConfig) -> Verifier {
        Verifier::new(&AuthConfig {
            secret: Some(secret()),
            ..config
        })
        .unwrap()
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_token_verifies() {
        let verifier = verifier(AuthConfig::default());
        let alice = UserId::parse("alice").unwrap();
        let (user, _) = verifier
            .verify(&mint(&secret(), &alice, now(), 60))
            .unwrap();
        assert_eq!(user, alice);
    }

    #[test]
    fn expired_wrongly_signed_and_garbage_tokens_are_refused() {
        let verifier = verifier(AuthConfig::default());
        let alice = UserId::parse("alice").unwrap();
        let expired = mint(&secret(), &alice, now() - 3600, 60);
        assert!(matches!(verifier.verify(&expired), Err(AuthError::Expired)));
        let other = Secret::new("another-secret-another-secret-xx");
        assert!(matches!(
            verifier.verify(&mint(&other, &alice, now(), 60)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            verifier.verify("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_token_not_yet_valid_is_refused() {
        let verifier = verifier(AuthConfig::default());
        let claims = serde_json::json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret().expose().as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            verifier.verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn issuer_is_enforced_when_configured() {
        let config = AuthConfig {
            issuer: Some("https://app.example".into()),
            ..AuthConfig::default()
        };
        let verifier = verifier(config);
        let token = mint(&secret(), &UserId::parse("alice").unwrap(), now(), 60);
        assert!(matches!(
            verifier.verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }
}
