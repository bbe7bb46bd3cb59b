//! The DNS proxy each enrolled pod gets on port 15053 (UDP and TCP), as
//! upstream ztunnel's `src/dns`: names the mesh knows (Services, headless
//! Services' pods) are answered from the workload store; everything else is
//! forwarded to the upstream resolvers (ztunnel's own `/etc/resolv.conf`
//! nameservers by default), over the protocol the query came on.
//!
//! - [`names`]: which names a query may mean (search domains, Kubernetes
//!   short forms, wildcards): pure.
//! - [`lookup`]: the answer from a store snapshot, or "forward": pure.
//! - [`message`]: DNS messages in and out (hickory-proto): malformed
//!   queries, responses, truncation.
//! - [`forwarder`]: the upstream resolvers and the exchange with them.
//! - [`metrics`]: upstream's `istio_dns_*` metrics.
//! - [`on_demand`]: the addresses of workloads known by hostname only,
//!   looked up as connections need them (not part of the DNS proxy: it
//!   runs whether or not the proxy does).
//!
//! The listeners themselves run with the pod's other listeners
//! (`proxy::dns`).

pub mod forwarder;
pub mod lookup;
pub mod message;
pub mod metrics;
pub mod names;
pub mod on_demand;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

pub use forwarder::Forwarder;
pub use metrics::Metrics;
pub use names::Domains;

/// Upstream's record TTL for answers from the store
/// (`DEFAULT_TTL_SECONDS` in upstream's `src/dns/server.rs`).
pub const TTL_SECONDS: u32 = 30;

/// How long a TCP client may take to send its next query before the
/// connection is closed (upstream's `DEFAULT_TCP_REQUEST_TIMEOUT`).
pub const TCP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Upstream's setting for DNS capture (istio-cni) and the DNS proxy
/// (ztunnel reads proxy metadata `DNS_CAPTURE`, i.e. this variable).
pub const CAPTURE_ENV: &str = "ISTIO_META_DNS_CAPTURE";
/// Our earlier name for it, still read when [`CAPTURE_ENV`] is not set.
pub const CAPTURE_ENV_ALIAS: &str = "DNS_CAPTURE";

/// The default of `--dns-capture` when [`CAPTURE_ENV`] is not set: the
/// alias's value (`true`/`false`), else on, as upstream's default.
pub fn capture_default() -> bool {
    capture_from(std::env::var(CAPTURE_ENV_ALIAS).ok().as_deref())
}

fn capture_from(alias: Option<&str>) -> bool {
    !matches!(alias.map(str::trim), Some(v) if v.eq_ignore_ascii_case("false") || v == "0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn capture_is_on_unless_the_alias_turns_it_off() {
        assert!(super::capture_from(None));
        assert!(super::capture_from(Some("true")));
        assert!(!super::capture_from(Some("false")));
        assert!(!super::capture_from(Some("0")));
    }
}
