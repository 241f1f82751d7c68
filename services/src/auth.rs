//! Token verification at the WebSocket upgrade, and minting for development.
//!
//! Tokens are HS256 JWTs issued by the embedding application's backend with the shared
//! secret: `sub` is the user id, `exp` is required. Browsers cannot set headers on a
//! WebSocket, so the token is accepted from `Authorization: Bearer …` or from the
//! `access_token` query parameter; the gateway never logs either.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parley_events::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Secret};

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
}

impl AuthError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::TokenMissing,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Invalid(_) => ErrorCode::TokenInvalid,
        }
    }
}

/// Verifies tokens with one configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &Secret, config: &AuthConfig) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Verifier {
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    /// The user a token names, if it is valid now.
    pub fn verify(&self, token: &str) -> Result<(UserId, Claims), AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let user = UserId::parse(data.claims.sub.clone())
            .map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok((user, data.claims))
    }
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

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn minted_token_verifies() {
        let verifier = Verifier::new(&secret(), &AuthConfig::default());
        let alice = UserId::parse("alice").unwrap();
        let (user, _) = verifier
            .verify(&mint(&secret(), &alice, now(), 60))
            .unwrap();
        assert_eq!(user, alice);
    }

    #[test]
    fn expired_wrongly_signed_and_garbage_tokens_are_refused() {
        let verifier = Verifier::new(&secret(), &AuthConfig::default());
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
        let verifier = Verifier::new(&secret(), &AuthConfig::default());
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
        let verifier = Verifier::new(&secret(), &config);
        let token = mint(&secret(), &UserId::parse("alice").unwrap(), now(), 60);
        assert!(matches!(
            verifier.verify(&token),
            Err(AuthError::Invalid(_))
        ));
    }
}
