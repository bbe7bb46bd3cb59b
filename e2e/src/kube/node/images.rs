//! The node runtime's images: there is no registry and no image store, so
//! an image is a name in [`IMAGES`] standing for one of the workspace's
//! binaries. A container of that image sees the host's filesystem (see
//! [`super::launch`]) plus the image's binary at [`ImageEntry::path`],
//! which is also its entrypoint, and the package's other binaries the
//! image ships beside it ([`ImageEntry::also`]); the image has no default
//! arguments.
//!
//! An image reference matches by its last path component without tag or
//! digest: `istio-rs/ztunnel-rs:1.2`, `localhost:5000/x/ztunnel-rs@sha256:..`
//! and `ztunnel-rs` all name `ztunnel-rs`. Any other image fails the
//! container with `ErrImagePull`, naming the image and this table.

use std::path::{Path, PathBuf};

use crate::binaries::{Binaries, BinaryError};

/// Where the table is, for messages.
pub const TABLE: &str = "e2e/src/kube/node/images.rs (IMAGES)";

/// One image: which workspace binary it holds and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// The image name (last path component of the reference).
    pub name: &'static str,
    /// The cargo package and binary.
    pub package: &'static str,
    pub binary: &'static str,
    /// The binary's path inside the image: the entrypoint.
    pub path: &'static str,
    /// Other binaries of the package the image ships next to the
    /// entrypoint (same directory), as its Dockerfile copies them.
    pub also: &'static [&'static str],
}

/// Every image the node runtime can run.
pub const IMAGES: &[ImageEntry] = &[
    ImageEntry {
        name: "istiod-rs",
        package: "istiod-rs",
        binary: "istiod-rs",
        path: "/usr/local/bin/istiod-rs",
        also: &[],
    },
    ImageEntry {
        name: "ztunnel-rs",
        package: "ztunnel-rs",
        binary: "ztunnel-rs",
        path: "/usr/local/bin/ztunnel-rs",
        // manifests/images/ztunnel-rs.Dockerfile: the node agent's binary and
        // the CNI plugin its installer copies onto the node.
        also: &["ztunnel-rs-cni", "istio-cni-rs"],
    },
    ImageEntry {
        name: "waypoint-rs",
        package: "waypoint-rs",
        binary: "waypoint-rs",
        path: "/usr/local/bin/waypoint-rs",
        also: &[],
    },
    ImageEntry {
        name: "istioctl-rs",
        package: "istioctl-rs",
        binary: "istioctl-rs",
        path: "/usr/local/bin/istioctl-rs",
        also: &[],
    },
    ImageEntry {
        name: "echo",
        package: "e2e",
        binary: "echo",
        path: "/usr/local/bin/echo",
        also: &[],
    },
    ImageEntry {
        name: "client",
        package: "e2e",
        binary: "client",
        path: "/usr/local/bin/client",
        also: &[],
    },
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image {image:?} is not in the node runtime's image table {TABLE}; known images: {known}"
    )]
    Unknown { image: String, known: String },
    #[error("image {image:?}: {source}")]
    Binary { image: String, source: BinaryError },
}

/// The image's name: the reference's last path component, without tag or digest.
pub fn image_name(reference: &str) -> &str {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// The table entry of `reference`.
pub fn lookup(reference: &str) -> Result<&'static ImageEntry, ImageError> {
    let name = image_name(reference);
    IMAGES
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| ImageError::Unknown {
            image: reference.to_string(),
            known: IMAGES.iter().map(|e| e.name).collect::<Vec<_>>().join(", "),
        })
}

/// One binary of an image: the host file behind it and its path in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageBinary {
    pub host: PathBuf,
    pub path: PathBuf,
}

/// The image's entry and its binaries, the entrypoint first (built if stale).
pub fn resolve(
    binaries: &Binaries,
    reference: &str,
) -> Result<(&'static ImageEntry, Vec<ImageBinary>), ImageError> {
    let entry = lookup(reference)?;
    let entrypoint = Path::new(entry.path);
    std::iter::once((entry.binary, entrypoint.to_path_buf()))
        .chain(
            entry
                .also
                .iter()
                .map(|name| (*name, entrypoint.with_file_name(name))),
        )
        .map(|(name, path)| {
            let host = binaries
                .get(entry.package, name)
                .map_err(|source| ImageError::Binary {
                    image: reference.to_string(),
                    source,
                })?;
            Ok(ImageBinary { host, path })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|files| (entry, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_by_name_without_registry_tag_or_digest() {
        assert_eq!(image_name("istio-rs/ztunnel-rs:1.2"), "ztunnel-rs");
        assert_eq!(
            image_name("localhost:5000/x/ztunnel-rs@sha256:abc"),
            "ztunnel-rs"
        );
        assert_eq!(image_name("echo"), "echo");
        assert_eq!(lookup("istio-rs/echo").unwrap().binary, "echo");
        let err = lookup("nginx:1.27").unwrap_err().to_string();
        assert!(err.starts_with("image \"nginx:1.27\" is not in the node runtime's image table e2e/src/kube/node/images.rs"), "{err}");
        assert!(err.contains("istiod-rs, ztunnel-rs, waypoint-rs"), "{err}");
    }
}
