//! What `/proc` says of a process: its status fields (memory) and its open
//! file descriptors. The benchmarks and the churn soak read the mesh's
//! components through it.

use std::path::PathBuf;

/// `/proc/<pid>/...` could not be read (the process is gone, or the path
/// is not there).
#[derive(Debug, thiserror::Error)]
#[error("could not read {path}: {source}")]
pub struct ProcError {
    pub path: String,
    pub source: std::io::Error,
}

fn path(pid: u32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

fn error(pid: u32, file: &str, source: std::io::Error) -> ProcError {
    ProcError {
        path: path(pid, file).display().to_string(),
        source,
    }
}

/// The text of `/proc/<pid>/<file>`.
pub fn read(pid: u32, file: &str) -> Result<String, ProcError> {
    std::fs::read_to_string(path(pid, file)).map_err(|e| error(pid, file, e))
}

/// A `kB` field of `/proc/<pid>/status` text (`key` with its colon, e.g.
/// `VmRSS:`), in kB.
pub fn status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A process's resident set size (`VmRSS`), in kB.
pub fn rss_kb(pid: u32) -> Result<u64, ProcError> {
    let status = read(pid, "status")?;
    status_kb(&status, "VmRSS:").ok_or_else(|| {
        error(
            pid,
            "status",
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no VmRSS line"),
        )
    })
}

/// What each open file descriptor of a process points at (the link
/// `/proc/<pid>/fd/<n>`: a path, `socket:[inode]`, `net:[inode]`, ...).
/// A descriptor closed while it is read is left out.
pub fn fd_targets(pid: u32) -> Result<Vec<String>, ProcError> {
    let dir = std::fs::read_dir(path(pid, "fd")).map_err(|e| error(pid, "fd", e))?;
    Ok(dir
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .map(|target| target.display().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kb() {
        let status = "Name:\tztunnel-rs\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kb(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kb(status, "RssAnon:"), None);
    }

    #[test]
    fn this_process_has_memory_and_descriptors() {
        let me = std::process::id();
        assert!(rss_kb(me).unwrap() > 0);
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let targets = fd_targets(me).unwrap();
        assert!(
            targets.iter().any(|t| t.ends_with("/status")),
            "{targets:?}"
        );
        drop(file);
        assert!(rss_kb(u32::MAX).is_err());
    }
}
