//! `parley up`: the whole platform on one machine. Starts nats-server and redis-server as
//! child processes when none is configured, keeps a development secret so tokens survive
//! restarts, and runs every role in this process. Browsers may open sockets only from its
//! own origins unless `gateway.allowed_origins` says otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parley_localstack::{LocalError, NatsOptions, NatsServer, RedisOptions, RedisServer};

use crate::config::{Config, Secret};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("cannot start a local server: {0}")]
    Server(#[from] LocalError),
    #[error("development secret at {path}: {cause}")]
    Secret {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The servers `parley up` started, stopped when this is dropped, and the configuration
/// that points at them.
pub struct LocalPlatform {
    pub config: Arc<Config>,
    pub nats: Option<NatsServer>,
    pub redis: Option<RedisServer>,
    pub secret_file: Option<PathBuf>,
}

impl LocalPlatform {
    /// Fill in what `config` leaves unset: NATS, Redis and the auth secret.
    pub fn prepare(mut config: Config) -> Result<LocalPlatform, UpError> {
        let data_dir = config.local.data_dir.clone();
        let nats = match config.nats.url {
            Some(_) => None,
            None => {
                let server = NatsServer::start(NatsOptions {
                    jetstream: true,
                    sync_always: config.local.fsync_always,
                    data_dir: Some(data_dir.join("nats")),
                    ..NatsOptions::default()
                })?;
                config.nats.url = Some(Secret::new(server.url()));
                Some(server)
            }
        };
        let redis = match config.redis.url {
            Some(_) => None,
            None => {
                let server = RedisServer::start(RedisOptions::default())?;
                config.redis.url = Some(Secret::new(server.url()));
                Some(server)
            }
        };
        let secret_file = match config.auth.secret {
            Some(_) => None,
            None => {
                let path = data_dir.join("dev-secret");
                config.auth.secret = Some(dev_secret(&path)?);
                // Only a secret of its own making: a configured one may sign real users.
                config.gateway.dev_tokens = true;
                Some(path)
            }
        };
        if config.gateway.web_dir.is_none() && Path::new(WEB_CHAT).join("index.html").is_file() {
            config.gateway.web_dir = Some(PathBuf::from(WEB_CHAT));
        }
        Ok(LocalPlatform {
            config: Arc::new(config),
            nats,
            redis,
            secret_file,
        })
    }
}

/// The web chat as `clients/web` builds it, from the repository's root (where
/// `infra/up.sh` runs `parley up`): served at `/` unless `gateway.web_dir` says otherwise.
const WEB_CHAT: &str = "clients/web/dist";
impl LocalPlatform {
    /// Unless `gateway.allowed_origins` is configured, allow only the origins of the
    /// gateway bound at `gateway` (its port is known only once bound): a page elsewhere
    /// must not open sockets with the development token of whoever runs `parley up`.
    pub fn allow_own_origins(&mut self, gateway: SocketAddr) {
        if self.config.gateway.allowed_origins.is_empty() {
            let tls = self.config.gateway.tls.enabled;
            Arc::make_mut(&mut self.config).gateway.allowed_origins = local_origins(gateway, tls);
        }
    }
}

/// The origins a page served by the gateway at `gateway` has: its address, and
/// `localhost` (with both loopback addresses) when it listens on loopback or everywhere.
pub fn local_origins(gateway: SocketAddr, tls: bool) -> Vec<String> {
    let scheme = if tls { "https" } else { "http" };
    let port = gateway.port();
    let ip = gateway.ip();
    let mut hosts = Vec::new();
    if ip.is_loopback() || ip.is_unspecified() {
        hosts.extend([
            IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
            format!("[{}]", Ipv6Addr::LOCALHOST),
            "localhost".to_owned(),
        ]);
    } else {
        hosts.push(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    hosts
        .into_iter()
        .map(|host| format!("{scheme}://{host}:{port}"))
        .collect()
}

/// The development secret stored at `path`, created (readable by the owner only) if
/// missing.
pub fn dev_secret(path: &Path) -> Result<Secret, UpError> {
    let fail = |cause| UpError::Secret {
        path: path.to_owned(),
        cause,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(Secret::new(text.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    write_private(path, &secret).map_err(fail)?;
    Ok(Secret::new(secret))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_origins_are_the_gateways_address_and_localhost() {
        assert_eq!(
            local_origins("127.0.0.1:8080".parse().unwrap(), false),
            [
                "http://127.0.0.1:8080",
                "http://[::1]:8080",
                "http://localhost:8080"
            ]
        );
        assert_eq!(
            local_origins("192.168.1.5:443".parse().unwrap(), true),
            ["https://192.168.1.5:443"]
        );
        assert_eq!(
            local_origins("[fd00::1]:8080".parse().unwrap(), false),
            ["http://[fd00::1]:8080"]
        );
    }

    #[test]
    fn dev_secret_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dev-secret");
        let first = dev_secret(&path).unwrap();
        assert!(first.expose().len() >= crate::config::MIN_SECRET_BYTES);
        assert_eq!(dev_secret(&path).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
