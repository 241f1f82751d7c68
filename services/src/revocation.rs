//! Token revocation: records in the `PARLEY_REVOCATIONS` key-value bucket, written by
//! `parley revoke`, and the set of them every gateway holds and follows.
//!
//! A user revocation covers that user's tokens issued (`iat`) at or before it, in whole
//! seconds, and their tokens without `iat`; the user signs in again with a token issued
//! later. A token revocation covers the token with that `jti`. Records expire after
//! `auth.revocation_ttl_secs`, which must outlast every token they cover, so the bucket
//! stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use parley_events::UserId;
use parley_events::subjects::REVOCATIONS_BUCKET;

use crate::auth::Claims;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot open or create the {REVOCATIONS_BUCKET} bucket: {0}")]
    Bucket(String),
    #[error("cannot read the {REVOCATIONS_BUCKET} bucket: {0}")]
    Read(String),
    #[error("cannot record the revocation: {0}")]
    Write(String),
}

/// What one record revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The user's tokens issued until the record's time.
    User(UserId),
    /// The token with this `jti`.
    Token(String),
}

impl Revocation {
    /// The record's key: a kind and the id in hex, since ids may hold any character and
    /// keys only a few.
    fn key(&self) -> String {
        let (kind, id) = match self {
            Revocation::User(user) => ("user", user.as_str()),
            Revocation::Token(jti) => ("token", jti.as_str()),
        };
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{kind}.{hex}")
    }

    fn from_key(key: &str) -> Option<Revocation> {
        let (kind, hex) = key.split_once('.')?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let id = String::from_utf8(bytes).ok()?;
        match kind {
            "user" => UserId::parse(id).ok().map(Revocation::User),
            "token" => Some(Revocation::Token(id)),
            _ => None,
        }
    }
}

/// The revocations bucket, created with `config`'s settings if no role or command has yet.
pub async fn bucket(
    js: &jetstream::Context,
    config: &Config,
) -> Result<kv::Store, RevocationError> {
    crate::topology::key_value(js, crate::topology::revocations_bucket_config(config))
        .await
        .map_err(|e| RevocationError::Bucket(e.to_string()))
}

/// Connect to the configured NATS and record `revocation` as made at `now_secs`: what
/// `parley revoke` does.
pub async fn record(
    config: &Config,
    revocation: &Revocation,
    now_secs: u64,
) -> Result<(), RevocationError> {
    let nats = crate::node::connect_nats(config, &crate::admin::Readiness::default())
        .await
        .map_err(|e| RevocationError::Bucket(e.to_string()))?;
    let store = bucket(&jetstream::new(nats.client.clone()), config).await?;
    revoke(&store, revocation, now_secs).await?;
    // Publishes are acknowledged by the server before `put` returns; flushing is only
    // for a clean goodbye.
    let _ = nats.client.flush().await;
    Ok(())
}

/// Record `revocation` as made at `now_secs`.
pub async fn revoke(
    store: &kv::Store,
    revocation: &Revocation,
    now_secs: u64,
) -> Result<(), RevocationError> {
    store
        .put(revocation.key(), now_secs.to_string().into())
        .await
        .map(drop)
        .map_err(|e| RevocationError::Write(e.to_string()))
}

/// The revocations in force, by when each was made (seconds since the epoch).
pub struct Revoked {
    ttl_secs: u64,
    records: Mutex<HashMap<RevocationKey, u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RevocationKey {
    User(UserId),
    Token(String),
}

impl From<Revocation> for RevocationKey {
    fn from(revocation: Revocation) -> Self {
        match revocation {
            Revocation::User(user) => RevocationKey::User(user),
            Revocation::Token(jti) => RevocationKey::Token(jti),
        }
    }
}

impl Revoked {
    /// Every record in `store` now, and a watch of the records added from then on.
    pub async fn load(
        store: &kv::Store,
        ttl_secs: u64,
    ) -> Result<(Revoked, kv::Watch), RevocationError> {
        let read = |e: &dyn std::fmt::Display| RevocationError::Read(e.to_string());
        // Watching first, so that a record put while the others are read is not missed.
        let watch = store.watch_all().await.map_err(|e| read(&e))?;
        let revoked = Revoked {
            ttl_secs,
            records: Mutex::default(),
        };
        let mut keys = store.keys().await.map_err(|e| read(&e))?;
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| read(&e))?;
            if let Some(entry) = store.entry(key).await.map_err(|e| read(&e))? {
                revoked.apply(&entry);
            }
        }
        Ok((revoked, watch))
    }

    /// Take in one record from the bucket; the revocation it makes, if any.
    pub fn apply(&self, entry: &kv::Entry) -> Option<(Revocation, u64)> {
        if entry.operation != kv::Operation::Put {
            return None;
        }
        let revocation = Revocation::from_key(&entry.key)?;
        let at: u64 = std::str::from_utf8(&entry.value).ok()?.parse().ok()?;
        let now = crate::unix_millis() / 1000;
        let mut records = self.records.lock().expect("revocations lock");
        // Records the bucket has let expire would otherwise stay here for good.
        records.retain(|_, made| made.saturating_add(self.ttl_secs) >= now);
        let slot = records
            .entry(RevocationKey::from(revocation.clone()))
            .or_insert(at);
        *slot = (*slot).max(at);
        Some((revocation, at))
    }

    /// Whether a token of `user` with `claims` is revoked.
    pub fn covers(&self, user: &UserId, claims: &Claims) -> bool {
        let records = self.records.lock().expect("revocations lock");
        let token = claims
            .jti
            .as_ref()
            .is_some_and(|jti| records.contains_key(&RevocationKey::Token(jti.clone())));
        token || covers_user(records.get(&RevocationKey::User(user.clone())), claims)
    }
}

/// Whether one revocation (of `user`, made at `at`) covers a token of `user` with `claims`.
pub fn revocation_covers(revocation: &Revocation, at: u64, user: &UserId, claims: &Claims) -> bool {
    match revocation {
        Revocation::User(revoked) => revoked == user && covers_user(Some(&at), claims),
        Revocation::Token(jti) => claims.jti.as_ref() == Some(jti),
    }
}

fn covers_user(revoked_at: Option<&u64>, claims: &Claims) -> bool {
    revoked_at.is_some_and(|at| claims.iat.is_none_or(|iat| iat <= *at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_whatever_the_id_holds() {
        for revocation in [
            Revocation::User(UserId::parse("alice.*>~é").unwrap()),
            Revocation::Token("0f3e-jti/with:odd chars".into()),
        ] {
            let key = revocation.key();
            assert!(
                key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'),
                "{key}"
            );
            assert_eq!(Revocation::from_key(&key), Some(revocation));
        }
        assert_eq!(Revocation::from_key("user.zz"), None);
    }

    #[test]
    fn a_user_revocation_covers_tokens_issued_until_then_and_those_without_iat() {
        let alice = UserId::parse("alice").unwrap();
        let claims = |iat| Claims {
            sub: "alice".into(),
            exp: 2000,
            iat,
            iss: None,
            aud: None,
            jti: None,
        };
        let revocation = Revocation::User(alice.clone());
        assert!(revocation_covers(
            &revocation,
            1000,
            &alice,
            &claims(Some(999))
        ));
        assert!(revocation_covers(
            &revocation,
            1000,
            &alice,
            &claims(Some(1000))
        ));
        assert!(revocation_covers(&revocation, 1000, &alice, &claims(None)));
        assert!(!revocation_covers(
            &revocation,
            1000,
            &alice,
            &claims(Some(1001))
        ));
        let bob = UserId::parse("bob").unwrap();
        assert!(!revocation_covers(
            &revocation,
            1000,
            &bob,
            &claims(Some(999))
        ));
    }
}
