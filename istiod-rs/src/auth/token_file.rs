//! Local mode's stand-in for TokenReview: a YAML file mapping bearer tokens
//! to callers.
//!
//! ```yaml
//! tokens:
//!   - token: "node-1-secret"
//!     serviceAccount: istio-system/ztunnel
//!     node: node-1
//!   - token: "client-secret"
//!     serviceAccount: demo/client
//! ```
//!
//! The file is re-read when it changes (a `stat` per request compares
//! modification time, size and inode). A file that fails to load at start
//! is an error; a bad edit later keeps the last good table in force and is
//! logged, so a typo does not lock every proxy out.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{AuthError, AuthFuture, Authenticator, Caller, ServiceAccount};

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("could not read token file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "token file {}: {reason} (expected `tokens: [{{token, serviceAccount, node}}]`)",
        path.display()
    )]
    Parse { path: PathBuf, reason: String },
    #[error("token file {}: tokens[{index}].{field}: {reason}", path.display())]
    Entry {
        path: PathBuf,
        index: usize,
        field: &'static str,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContents {
    #[serde(default)]
    tokens: Vec<Entry>,
}

/// Every field optional here so that a missing one is reported with its
/// entry index rather than as a bare parse error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    token: Option<String>,
    service_account: Option<String>,
    node: Option<String>,
}

/// Callers by the SHA-256 of their token: lookups do not compare secrets
/// byte by byte, and the table holds no token in the clear.
pub type Table = HashMap<[u8; 32], Caller>;

/// What identifies one version of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Fingerprint {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

/// Authenticates bearer tokens against a token file.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    trust_domain: String,
    table: ArcSwap<Table>,
    /// The version last loaded (or last tried); held while reloading so a
    /// burst of requests reloads once.
    loaded: Mutex<Option<Fingerprint>>,
}

impl TokenFile {
    /// Loads the file; any bad entry is an error naming it.
    pub fn open(path: impl Into<PathBuf>, trust_domain: &str) -> Result<Self, TokenFileError> {
        let path = path.into();
        let fingerprint = Fingerprint::of(&path).map_err(|source| TokenFileError::Read {
            path: path.clone(),
            source,
        })?;
        let table = load(&path, trust_domain)?;
        if table.is_empty() {
            tracing::warn!(path = %path.display(), "the token file has no tokens; every request will be refused");
        }
        Ok(TokenFile {
            path,
            trust_domain: trust_domain.to_string(),
            table: ArcSwap::from_pointee(table),
            loaded: Mutex::new(Some(fingerprint)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The caller `token` belongs to, after picking up any change to the file.
    pub fn caller(&self, token: &str) -> Result<Caller, AuthError> {
        self.reload_if_changed();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.table
            .load()
            .get(&digest)
            .cloned()
            .ok_or_else(|| AuthError::InvalidToken("unknown token".into()))
    }

    fn reload_if_changed(&self) {
        let current = Fingerprint::of(&self.path).ok();
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if current == *loaded {
            return;
        }
        *loaded = current;
        if current.is_none() {
            tracing::warn!(path = %self.path.display(), "the token file has gone; keeping the tokens last loaded");
            return;
        }
        match load(&self.path, &self.trust_domain) {
            Ok(table) => {
                tracing::info!(path = %self.path.display(), tokens = table.len(), "token file reloaded");
                self.table.store(Arc::new(table));
            }
            Err(error) => {
                tracing::error!(%error, "token file not reloaded; keeping the tokens last loaded");
            }
        }
    }
}

impl Authenticator for TokenFile {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.caller(token)))
    }
}

fn load(path: &Path, trust_domain: &str) -> Result<Table, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, trust_domain)
}

/// Reads the file's text (`path` only names it in errors). Public for the
/// fuzz targets (`fuzz/`).
#[doc(hidden)]
pub fn parse(path: &Path, text: &str, trust_domain: &str) -> Result<Table, TokenFileError> {
    let contents: FileContents = if text.trim().is_empty() {
        FileContents { tokens: Vec::new() }
    } else {
        serde_saphyr::from_str(text).map_err(|e| TokenFileError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
    };
    let mut table = Table::new();
    let mut first_use: HashMap<[u8; 32], usize> = HashMap::new();
    for (index, entry) in contents.tokens.into_iter().enumerate() {
        let bad = |field, reason: String| TokenFileError::Entry {
            path: path.to_path_buf(),
            index,
            field,
            reason,
        };
        let token = entry
            .token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| bad("token", "missing or empty".into()))?;
        let service_account: ServiceAccount = entry
            .service_account
            .ok_or_else(|| bad("serviceAccount", "missing".into()))?
            .parse()
            .map_err(|e: super::InvalidServiceAccount| bad("serviceAccount", e.to_string()))?;
        let identity = service_account
            .identity(trust_domain)
            .map_err(|e| bad("serviceAccount", e.to_string()))?;
        let node = match entry.node {
            Some(node) if node.trim().is_empty() => {
                return Err(bad("node", "empty; leave the field out instead".into()));
            }
            node => node,
        };
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        if let Some(first) = first_use.insert(digest, index) {
            return Err(bad(
                "token",
                format!("the same token as tokens[{first}]; each token names one caller"),
            ));
        }
        table.insert(
            digest,
            Caller {
                identity,
                pod: None,
                node,
            },
        );
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn parse_str(text: &str) -> Result<Table, TokenFileError> {
        parse(Path::new("tokens.yaml"), text, TD)
    }

    #[test]
    fn maps_tokens_to_callers() {
        let table = parse_str(
            r#"
tokens:
  - token: node-1-secret
    serviceAccount: istio-system/ztunnel
    node: node-1
  - token: "client secret"
    serviceAccount: demo/client
"#,
        )
        .unwrap();
        let ztunnel = &table[&<[u8; 32]>::from(Sha256::digest(b"node-1-secret"))];
        assert_eq!(
            ztunnel.identity.to_string(),
            "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        );
        assert_eq!(ztunnel.node.as_deref(), Some("node-1"));
        let client = &table[&<[u8; 32]>::from(Sha256::digest(b"client secret"))];
        assert_eq!(
            client.identity.to_string(),
            "spiffe://cluster.local/ns/demo/sa/client"
        );
        assert_eq!(client.node, None);
    }

    #[test]
    fn names_the_bad_entry_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                "tokens:\n  - token: a\n    serviceAccount: demo/x\n  - serviceAccount: demo/y\n",
                "tokens[1].token: missing",
            ),
            (
                "tokens:\n  - token: a\n",
                "tokens[0].serviceAccount: missing",
            ),
            (
                "tokens:\n  - token: a\n    serviceAccount: client\n",
                "tokens[0].serviceAccount: \"client\" is not a service account",
            ),
            (
                "tokens:\n  - token: a\n    serviceAccount: demo/bad name\n",
                "tokens[0].serviceAccount: service account \"bad name\"",
            ),
            (
                "tokens:\n  - token: a\n    serviceAccount: demo/x\n    node: ''\n",
                "tokens[0].node: empty",
            ),
            (
                "tokens:\n  - token: a\n    serviceAccount: demo/x\n  - token: a\n    serviceAccount: demo/y\n",
                "tokens[1].token: the same token as tokens[0]",
            ),
        ];
        for (text, want) in cases {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err:?} should say {want:?}");
            assert!(err.contains("tokens.yaml"), "{err}");
        }
        let err = parse_str("tokens:\n  - token: a\n    serviceAcount: demo/x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("serviceAcount"), "{err}");
        assert!(parse_str("tokens: 5").is_err());
        assert!(parse_str("").unwrap().is_empty());
    }

    #[test]
    fn reloads_on_change_and_keeps_the_last_good_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        std::fs::write(&path, "tokens:\n  - {token: t1, serviceAccount: demo/a}\n").unwrap();
        let file = TokenFile::open(&path, TD).unwrap();
        assert_eq!(file.caller("t1").unwrap().identity.service_account(), "a");
        assert!(matches!(file.caller("t2"), Err(AuthError::InvalidToken(_))));

        // A new file (new inode) is picked up on the next request.
        let tmp = dir.path().join("tokens.new");
        std::fs::write(&tmp, "tokens:\n  - {token: t2, serviceAccount: demo/b}\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(file.caller("t2").unwrap().identity.service_account(), "b");
        assert!(file.caller("t1").is_err());

        // A broken edit keeps t2 working.
        std::fs::write(&tmp, "tokens:\n  - {token: t3}\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(file.caller("t2").is_ok());
        assert!(file.caller("t3").is_err());
    }

    #[test]
    fn open_fails_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        let err = TokenFile::open(&path, TD).unwrap_err();
        assert!(matches!(err, TokenFileError::Read { .. }), "{err}");
        std::fs::write(&path, "tokens:\n  - {serviceAccount: demo/a}\n").unwrap();
        let err = TokenFile::open(&path, TD).unwrap_err().to_string();
        assert!(err.contains("tokens[0].token"), "{err}");
    }
}
