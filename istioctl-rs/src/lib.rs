//! istioctl-rs: the mesh's command-line tool. A library with a thin
//! `main.rs`, so that tests (over a mock API server, or a real one) drive
//! the same code the binary runs.
//!
//! - [`values`] and [`render`]: the install values and the one templating
//!   rule of the manifests (`${key}`);
//! - [`manifest`]: the embedded manifests rendered, strictly decoded,
//!   labelled and ordered;
//! - [`cluster`]: every call to the Kubernetes API, and errors that say
//!   what to do;
//! - [`install`], [`uninstall`], [`precheck`], [`version`], [`waypoint`]:
//!   the commands; [`mesh_root`] and [`rollout`] are parts of `install`;
//! - [`ztunnel_config`]: `ztunnel-config`, a ztunnel's `/config_dump` as
//!   upstream istioctl shows it;
//! - [`proxy_status`]: `proxy-status`, istiod-rs's `/debug/syncz`: every
//!   connected proxy's sync state per resource type;
//! - [`describe`]: `x describe pod|service`, how traffic to one pod or
//!   service flows, from the same `/config_dump`;
//! - [`admin_http`]: the plain-HTTP GET of a debug endpoint both use;
//! - [`pods`]: the mesh's ztunnel and istiod pods on Kubernetes, and a GET
//!   to their debug ports through a port-forward;
//! - [`analyze`]: `analyze`, istiod-rs's index's findings about files or
//!   a live cluster, as upstream istioctl prints its analysis messages.

pub mod admin_http;
pub mod analyze;
pub mod cluster;
pub mod describe;
pub mod install;
pub mod manifest;
pub mod mesh_root;
pub mod pods;
pub mod precheck;
pub mod proxy_status;
pub mod render;
pub mod rollout;
pub mod uninstall;
pub mod values;
pub mod version;
pub mod waypoint;
pub mod ztunnel_config;
