//! A pod's `/etc/resolv.conf`, written as the kubelet writes it from the
//! pod's `dnsPolicy` and `dnsConfig` and the node's settings (kubelet's
//! `--cluster-dns`, `--cluster-domain`, `--resolv-conf`), and bind-mounted
//! over `/etc/resolv.conf` in each of the pod's containers:
//!
//! - `ClusterFirst` (the default): the cluster's nameservers, the search
//!   list `<ns>.svc.<domain> svc.<domain> <domain>` then the node's
//!   search domains, `options ndots:5`. A `hostNetwork` pod, or a node
//!   without cluster DNS, gets `Default` instead (as the kubelet does).
//! - `ClusterFirstWithHostNet`: `ClusterFirst`, `hostNetwork` or not.
//! - `Default`: the node's resolv.conf (its nameservers, search list and
//!   options).
//! - `None`: only what `dnsConfig` says.
//!
//! `dnsConfig` is then added: its nameservers and searches after the
//! policy's (duplicates dropped), its options over the policy's by name.

use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

/// The node's DNS settings for its pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDns {
    /// kubelet's `--cluster-dns`; empty: no cluster DNS (`ClusterFirst`
    /// pods get `Default`).
    pub cluster_dns: Vec<IpAddr>,
    /// kubelet's `--cluster-domain`.
    pub cluster_domain: String,
    /// kubelet's `--resolv-conf`: the node's own, what `Default` copies.
    pub resolv_conf: PathBuf,
}

impl Default for PodDns {
    fn default() -> Self {
        PodDns {
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// The text of `pod`'s resolv.conf, given the node's settings and the text
/// of the node's resolv.conf.
pub fn pod_resolv_conf(pod: &Pod, dns: &PodDns, node_resolv_conf: &str) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirstWithHostNet" => !dns.cluster_dns.is_empty(),
        "ClusterFirst" => !host_network && !dns.cluster_dns.is_empty(),
        _ => false,
    };
    let node = node_file(node_resolv_conf);
    let (mut nameservers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        if policy == "None" {
            Default::default()
        } else if cluster {
            let d = &dns.cluster_domain;
            (
                dns.cluster_dns.iter().map(|ip| ip.to_string()).collect(),
                [
                    format!("{namespace}.svc.{d}"),
                    format!("svc.{d}"),
                    d.clone(),
                ]
                .into_iter()
                .chain(node.searches)
                .collect(),
                vec!["ndots:5".into()],
            )
        } else {
            (node.nameservers, node.searches, node.options)
        };
    if let Some(config) = spec.dns_config {
        for ns in config.nameservers.into_iter().flatten() {
            if !nameservers.contains(&ns) {
                nameservers.push(ns);
            }
        }
        for s in config.searches.into_iter().flatten() {
            if !searches.contains(&s) {
                searches.push(s);
            }
        }
        for o in config.options.into_iter().flatten() {
            let Some(name) = o.name else { continue };
            options.retain(|existing| existing.split(':').next() != Some(name.as_str()));
            options.push(match o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    let mut text = String::new();
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for ns in nameservers {
        text.push_str(&format!("nameserver {ns}\n"));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    text
}

#[derive(Default)]
struct NodeFile {
    nameservers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

/// The node's lines as the kubelet copies them (words, unchecked).
fn node_file(text: &str) -> NodeFile {
    let mut file = NodeFile::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => file.nameservers.extend(words.next().map(str::to_string)),
            Some("search" | "domain") => file.searches = words.map(str::to_string).collect(),
            Some("options") => file.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "demo"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn node_dns() -> PodDns {
        PodDns {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            ..PodDns::default()
        }
    }

    const NODE: &str = "# the node's\nnameserver 192.0.2.53\nsearch corp.example\noptions edns0\n";

    #[test]
    fn cluster_first_names_the_cluster_dns_and_the_namespace_search_list() {
        let p = pod(json!({"containers": []}));
        assert_eq!(
            pod_resolv_conf(&p, &node_dns(), NODE),
            "search demo.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn host_network_and_no_cluster_dns_fall_back_to_the_node_file() {
        let node_copy = "search corp.example\nnameserver 192.0.2.53\noptions edns0\n";
        let host = pod(json!({"containers": [], "hostNetwork": true}));
        assert_eq!(pod_resolv_conf(&host, &node_dns(), NODE), node_copy);
        let plain = pod(json!({"containers": []}));
        assert_eq!(pod_resolv_conf(&plain, &PodDns::default(), NODE), node_copy);
        let with_net = pod(json!({"containers": [], "hostNetwork": true,
                                  "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert!(pod_resolv_conf(&with_net, &node_dns(), NODE).contains("nameserver 10.96.0.10\n"));
    }

    #[test]
    fn dns_config_adds_to_the_policy_and_none_takes_only_it() {
        let p = pod(json!({"containers": [], "dnsConfig": {
            "nameservers": ["10.96.0.10", "192.0.2.1"],
            "searches": ["extra.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}],
        }}));
        assert_eq!(
            pod_resolv_conf(&p, &node_dns(), NODE),
            "search demo.svc.cluster.local svc.cluster.local cluster.local corp.example extra.example\n\
             nameserver 10.96.0.10\nnameserver 192.0.2.1\noptions ndots:2 rotate\n"
        );
        let none = pod(json!({"containers": [], "dnsPolicy": "None",
                              "dnsConfig": {"nameservers": ["192.0.2.1"]}}));
        assert_eq!(
            pod_resolv_conf(&none, &node_dns(), NODE),
            "nameserver 192.0.2.1\n"
        );
    }
}
