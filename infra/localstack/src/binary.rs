//! Finding server executables and checking their versions.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::LocalError;

/// The script that installs nats-server and redis-server into `.parley/bin`.
pub const SERVERS_INSTALLER: &str = "infra/install.sh";

/// Finds the executable `name`, which `installer` (a script of this repository) installs.
///
/// Search order, first executable file wins:
/// 1. `$PARLEY_HOME/bin`, if the `PARLEY_HOME` environment variable is set;
/// 2. `.parley/bin` in the current directory and in each of its ancestors (so tests, which
///    cargo runs from the crate's directory, find the repository's install);
/// 3. each directory on `PATH`.
///
/// Returns [`LocalError::BinaryNotFound`], listing every directory searched and telling the
/// user to run `installer`, when none has it.
pub fn find_binary(name: &str, installer: &'static str) -> Result<PathBuf, LocalError> {
    let mut searched = Vec::new();
    if let Some(home) = env::var_os("PARLEY_HOME").filter(|h| !h.is_empty()) {
        searched.push(PathBuf::from(home).join("bin"));
    }
    if let Ok(cwd) = env::current_dir() {
        searched.extend(cwd.ancestors().map(|dir| dir.join(".parley").join("bin")));
    }
    if let Some(path) = env::var_os("PATH") {
        searched.extend(env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()));
    }
    for dir in &searched {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(LocalError::BinaryNotFound {
        name: name.to_owned(),
        searched,
        installer,
    })
}

fn is_executable(path: &Path) -> bool {
    // `metadata` follows symlinks: a dangling link is not executable.
    let Ok(meta) = path.metadata() else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Finds `name` (installed by `installer`), reads its version and checks it is at least
/// `min_version`: the binary and its version.
pub(crate) fn locate(
    name: &str,
    min_version: &str,
    installer: &'static str,
) -> Result<(PathBuf, String), LocalError> {
    let binary = find_binary(name, installer)?;
    let version = binary_version(&binary)?;
    require_version(&binary, &version, min_version, installer)?;
    Ok((binary, version))
}

/// Runs `<binary> --version` and returns the first dotted version number it prints
/// (`nats-server: v2.15.1` gives `2.15.1`; `Redis server v=7.0.15 sha=...` gives `7.0.15`).
fn binary_version(binary: &Path) -> Result<String, LocalError> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LocalError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    match parse_version(&text) {
        Some(v) if output.status.success() => Ok(v),
        _ => Err(LocalError::UnknownVersion {
            binary: binary.to_owned(),
            output: text.trim().to_owned(),
        }),
    }
}

/// Fails with [`LocalError::TooOld`], naming `installer`, when `found` < `required`.
pub(crate) fn require_version(
    binary: &Path,
    found: &str,
    required: &str,
    installer: &'static str,
) -> Result<(), LocalError> {
    if version_numbers(found) >= version_numbers(required) {
        Ok(())
    } else {
        Err(LocalError::TooOld {
            binary: binary.to_owned(),
            found: found.to_owned(),
            required: required.to_owned(),
            installer,
        })
    }
}

/// The first run of digits and dots that contains a dot, without a trailing dot.
pub(crate) fn parse_version(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            let candidate = text[start..i].trim_end_matches('.');
            if candidate.contains('.') {
                return Some(candidate.to_owned());
            }
        } else {
            i += 1;
        }
    }
    None
}

/// `2.15.1` -> `[2, 15, 1]`, padded to three components so `2.12` == `2.12.0`.
fn version_numbers(v: &str) -> Vec<u64> {
    let mut nums: Vec<u64> = v
        .split('.')
        .map(|part| {
            part.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect();
    while nums.len() < 3 {
        nums.push(0);
    }
    nums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_version("nats-server: v2.15.1\n").as_deref(),
            Some("2.15.1")
        );
        assert_eq!(
            parse_version("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0").as_deref(),
            Some("7.0.15")
        );
        assert_eq!(parse_version("no version here 42"), None);
    }

    #[test]
    fn compares_versions() {
        let p = Path::new("x");
        assert!(require_version(p, "2.15.1", "2.12.0", SERVERS_INSTALLER).is_ok());
        assert!(require_version(p, "2.12", "2.12.0", SERVERS_INSTALLER).is_ok());
        assert!(require_version(p, "2.12.0-beta", "2.12.0", SERVERS_INSTALLER).is_ok());
        assert!(matches!(
            require_version(p, "2.9.25", "2.12.0", SERVERS_INSTALLER),
            Err(LocalError::TooOld { .. })
        ));
        assert!(require_version(p, "10.0.0", "6.0.0", SERVERS_INSTALLER).is_ok());
    }
}
