//! A throwaway certificate authority for TLS tests (feature `pki`): PEM files for a server on
//! `127.0.0.1`, a client it trusts, and a second, foreign CA whose certificates nothing
//! trusts.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::process::temp_dir;
use crate::{LocalError, ServerTls};

/// The DNS name server certificates carry besides `127.0.0.1`.
pub const SERVER_NAME: &str = "localstack.parley.test";

/// A CA and the client certificate it signed, as PEM files.
#[derive(Debug, Clone)]
pub struct Authority {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// PEM files in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct TestPki {
    /// The CA servers and clients trust, with a client certificate it signed.
    pub trusted: Authority,
    /// A CA nobody trusts, with a client certificate it signed.
    pub foreign: Authority,
    /// The server's certificate (for `127.0.0.1` and [`SERVER_NAME`], signed by `trusted`)
    /// followed by the trusted CA's.
    pub server_cert: PathBuf,
    /// The server certificate's private key (PKCS#8, unencrypted).
    pub server_key: PathBuf,
    dir: TempDir,
}

fn failed(what: &str) -> impl FnOnce(rcgen::Error) -> LocalError + '_ {
    move |e| LocalError::io(format!("making the test {what}"))(std::io::Error::other(e))
}

fn write(path: &Path, contents: &str) -> Result<(), LocalError> {
    std::fs::write(path, contents).map_err(LocalError::io(format!("writing {}", path.display())))
}

fn ca_params(name: &str) -> Result<CertificateParams, LocalError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed("CA"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A CA called `name` with a client certificate it signed, written into `dir`.
fn authority(
    dir: &Path,
    name: &str,
) -> Result<(Authority, CertifiedIssuer<'static, KeyPair>), LocalError> {
    let ca_key = KeyPair::generate().map_err(failed("CA key"))?;
    let issuer = CertifiedIssuer::self_signed(ca_params(name)?, ca_key).map_err(failed("CA"))?;
    let key = KeyPair::generate().map_err(failed("client key"))?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(failed("client certificate"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("parley client ({name})"));
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(failed("client certificate"))?;
    let authority = Authority {
        ca: dir.join(format!("{name}-ca.pem")),
        client_cert: dir.join(format!("{name}-client.pem")),
        client_key: dir.join(format!("{name}-client-key.pem")),
    };
    write(&authority.ca, &issuer.pem())?;
    write(&authority.client_cert, &cert.pem())?;
    write(&authority.client_key, &key.serialize_pem())?;
    Ok((authority, issuer))
}

/// Directories are named `parley-pki-<pid>-...` so that those of a process that ended
/// without dropping its `TestPki` (one held in a `static`) can be told apart and removed.
const DIR_PREFIX: &str = "parley-pki-";

/// Removes the PKI directories of processes that are gone.
fn remove_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if !alive && pid.parse::<u32>().is_ok() {
            // Another process may be removing it too; either way it goes.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl TestPki {
    /// Makes the CA and certificates in a fresh temporary directory (removed on drop, or by
    /// a later `new` once this process has ended).
    pub fn new() -> Result<TestPki, LocalError> {
        remove_abandoned();
        let dir = temp_dir(&format!("{DIR_PREFIX}{}-", std::process::id()))?;
        let (trusted, issuer) = authority(dir.path(), "trusted")?;
        let (foreign, _) = authority(dir.path(), "foreign")?;
        let key = KeyPair::generate().map_err(failed("server key"))?;
        let cert = CertificateParams::new(vec![SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])
            .and_then(|params| params.signed_by(&key, &issuer))
            .map_err(failed("server certificate"))?;
        let chain = format!("{}{}", cert.pem(), issuer.pem());
        let pki = TestPki {
            trusted,
            foreign,
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server-key.pem"),
            dir,
        };
        write(&pki.server_cert, &chain)?;
        write(&pki.server_key, &key.serialize_pem())?;
        Ok(pki)
    }

    /// The server side: the server certificate, trusting the `trusted` CA for clients.
    pub fn server_tls(&self, require_client_cert: bool) -> ServerTls {
        ServerTls {
            cert_chain: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.trusted.ca.clone(),
            require_client_cert,
        }
    }

    /// A path inside the PKI's directory, for files a test writes itself.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
