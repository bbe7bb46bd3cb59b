//! Which names a query may mean, from the querying pod's point of view:
//! the name itself, its Kubernetes expansions (`svc` -> `svc.<ns>.svc.<cluster
//! domain>`, ...), and the name with one of the pod's search domains
//! stripped (a resolver that tried `svc.<ns>.svc.cluster.local` for an
//! external name). As upstream's `Store::get_aliases` / `to_kube_fqdns`
//! (`src/dns/server.rs`) and `trim_domain` (`src/dns/name_util.rs`).

use hickory_proto::ProtoError;
use hickory_proto::rr::Name;

/// The cluster's DNS domain and what follows from it.
#[derive(Clone, Debug)]
pub struct Domains {
    /// `cluster.local.`
    cluster: Name,
    /// `svc.cluster.local.`
    svc: Name,
}

/// One name to look up for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    pub name: Name,
    /// The requested name without the search domain the client's resolver
    /// appended, when this alias came from stripping it: the answer then
    /// carries a CNAME from the requested name to this one.
    pub stripped: Option<Name>,
    /// May be `<pod-hostname>.<subdomain>.<ns>.svc.<cluster domain>`, a pod
    /// of a headless Service.
    pub pod_host: bool,
}

impl Domains {
    pub fn new(cluster_domain: &str) -> Result<Self, ProtoError> {
        let cluster = fqdn(cluster_domain)?;
        let svc = Name::from_ascii("svc")?.append_domain(&cluster)?;
        Ok(Domains { cluster, svc })
    }

    /// `.svc.cluster.local`: the suffix of Kubernetes Service hostnames.
    pub fn kubernetes_suffix(&self) -> String {
        format!(".{}", self.svc.to_ascii().trim_end_matches('.'))
    }

    /// The search domains of a pod in `namespace` (Kubernetes' defaults:
    /// `<ns>.svc.<domain> svc.<domain> <domain>`), as upstream's shared-mode
    /// forwarder assumes them (`SystemForwarder::search_domains`).
    pub fn search(&self, namespace: &str) -> Vec<Name> {
        let mut out = Vec::with_capacity(3);
        if let Ok(ns) = self.namespaced(namespace) {
            out.push(ns);
        }
        out.push(self.svc.clone());
        out.push(self.cluster.clone());
        out
    }

    /// `<ns>.svc.<domain>.`
    fn namespaced(&self, namespace: &str) -> Result<Name, ProtoError> {
        Name::from_ascii(namespace)?.append_domain(&self.svc)
    }

    /// Every name worth looking up for `name` asked by a pod in
    /// `namespace`, most specific first, without repeats.
    pub fn aliases(&self, namespace: &str, name: &Name) -> Vec<Alias> {
        let mut out: Vec<Alias> = Vec::new();
        let mut add = |alias: Alias| {
            if !out.iter().any(|a| a.name == alias.name) {
                out.push(alias);
            }
        };
        // Upstream assumes pod FQDNs have six labels.
        let pod_host = name.num_labels() == 6;
        add(Alias {
            name: name.clone(),
            stripped: None,
            pod_host,
        });
        let Ok(namespaced) = self.namespaced(namespace) else {
            return out;
        };
        for (name, pod_host) in self.kube_fqdns(name, &namespaced) {
            add(Alias {
                name,
                stripped: None,
                pod_host,
            });
        }
        for search in self.search(namespace) {
            let Some(stripped) = trim_domain(name, &search) else {
                continue;
            };
            add(Alias {
                name: stripped.clone(),
                stripped: Some(stripped.clone()),
                pod_host,
            });
            for (expanded, pod_host) in self.kube_fqdns(&stripped, &namespaced) {
                add(Alias {
                    name: expanded,
                    stripped: Some(stripped.clone()),
                    pod_host,
                });
            }
        }
        out
    }

    /// The Kubernetes FQDNs a short name can stand for (`true`: a pod host
    /// of a headless Service):
    /// `svc` -> `svc.<ns>.svc.<d>`; `a.b` -> `a.b.svc.<d>`, pod `a.b.<ns>.svc.<d>`;
    /// `a.b.svc` -> `a.b.svc.<d>`; `a.b.c` -> pod `a.b.c.svc.<d>`;
    /// `a.b.c.svc` -> pod `a.b.c.svc.<d>`.
    fn kube_fqdns(&self, name: &Name, namespaced: &Name) -> Vec<(Name, bool)> {
        let append = |domain: &Name| name.clone().append_domain(domain).ok();
        let ends_in_svc = name
            .iter()
            .next_back()
            .is_some_and(|l| l.eq_ignore_ascii_case(b"svc"));
        let mut out = Vec::new();
        match name.num_labels() {
            1 => out.extend(append(namespaced).map(|n| (n, false))),
            2 => {
                out.extend(append(&self.svc).map(|n| (n, false)));
                out.extend(append(namespaced).map(|n| (n, true)));
            }
            3 => {
                if ends_in_svc {
                    out.extend(append(&self.cluster).map(|n| (n, false)));
                }
                out.extend(append(&self.svc).map(|n| (n, true)));
            }
            4 if ends_in_svc => out.extend(append(&self.cluster).map(|n| (n, true))),
            _ => {}
        }
        out
    }
}

/// `name` without `domain` at its end, when it ends in it and has more.
pub fn trim_domain(name: &Name, domain: &Name) -> Option<Name> {
    let keep = name.num_labels().checked_sub(domain.num_labels())?;
    if keep == 0 || !domain.zone_of(name) {
        return None;
    }
    Name::from_labels(name.iter().take(usize::from(keep))).ok()
}

/// The name, then wildcards of decreasing specificity:
/// `a.ns.svc.cluster.local` -> itself, `*.ns.svc.cluster.local`, ...,
/// `*.local` (upstream's `get_wildcards`): ServiceEntry hosts may be
/// wildcards.
pub fn wildcards(name: &Name) -> Vec<Name> {
    let mut out = vec![name.clone()];
    let mut name = name.clone();
    while name.num_labels() > 1 {
        out.push(name.clone().into_wildcard());
        name = name.base_name();
    }
    out
}

/// The store's spelling of a name: lower case, no trailing dot.
pub fn hostname(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_string()
}

/// `name` as an FQDN (a trailing dot or not).
pub fn fqdn(name: &str) -> Result<Name, ProtoError> {
    let mut name = Name::from_ascii(name)?;
    name.set_fqdn(true);
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        fqdn(s).unwrap()
    }

    fn domains() -> Domains {
        Domains::new("cluster.local").unwrap()
    }

    #[test]
    fn kubernetes_short_forms_expand_as_upstream() {
        let d = domains();
        let ns = d.namespaced("ns1").unwrap();
        let cases: &[(&str, &[(&str, bool)])] = &[
            ("name", &[("name.ns1.svc.cluster.local", false)]),
            (
                "name.ns2",
                &[
                    ("name.ns2.svc.cluster.local", false),
                    ("name.ns2.ns1.svc.cluster.local", true),
                ],
            ),
            (
                "name.ns2.svc",
                &[
                    ("name.ns2.svc.cluster.local", false),
                    ("name.ns2.svc.svc.cluster.local", true),
                ],
            ),
            (
                "name.ns2.not-svc",
                &[("name.ns2.not-svc.svc.cluster.local", true)],
            ),
            ("pod.sub.ns.svc", &[("pod.sub.ns.svc.cluster.local", true)]),
            ("pod.sub.ns.not-svc", &[]),
            ("name.ns2.svc.cluster.local", &[]),
        ];
        for (host, expected) in cases {
            let expected: Vec<(Name, bool)> = expected.iter().map(|(h, p)| (n(h), *p)).collect();
            assert_eq!(d.kube_fqdns(&n(host), &ns), expected, "{host}");
        }
    }

    #[test]
    fn search_domains_are_the_pods_namespace_first() {
        let got: Vec<String> = domains()
            .search("ns1")
            .iter()
            .map(|n| n.to_ascii())
            .collect();
        assert_eq!(
            got,
            [
                "ns1.svc.cluster.local.",
                "svc.cluster.local.",
                "cluster.local."
            ]
        );
        assert_eq!(domains().kubernetes_suffix(), ".svc.cluster.local");
    }

    #[test]
    fn a_search_domain_is_stripped_and_expanded_again() {
        let aliases = domains().aliases("ns1", &n("echo.ns2.ns1.svc.cluster.local"));
        let names: Vec<(String, Option<String>)> = aliases
            .iter()
            .map(|a| (a.name.to_ascii(), a.stripped.as_ref().map(Name::to_ascii)))
            .collect();
        assert!(names.contains(&("echo.ns2.ns1.svc.cluster.local.".into(), None)));
        // Stripping `ns1.svc.cluster.local` leaves `echo.ns2`, which expands.
        assert!(names.contains(&("echo.ns2.".into(), Some("echo.ns2.".into()))));
        assert!(names.contains(&(
            "echo.ns2.svc.cluster.local.".into(),
            Some("echo.ns2.".into())
        )));
    }

    #[test]
    fn trimming_needs_the_whole_domain_and_something_left() {
        assert_eq!(
            trim_domain(&n("a.b.example.com"), &n("example.com")),
            Some(n("a.b"))
        );
        assert_eq!(trim_domain(&n("example.com"), &n("example.com")), None);
        assert_eq!(trim_domain(&n("a.notexample.com"), &n("example.com")), None);
    }

    #[test]
    fn wildcards_go_from_specific_to_general() {
        let got: Vec<String> = wildcards(&n("a.ns.svc.cluster.local"))
            .iter()
            .map(Name::to_ascii)
            .collect();
        assert_eq!(
            got,
            [
                "a.ns.svc.cluster.local.",
                "*.ns.svc.cluster.local.",
                "*.svc.cluster.local.",
                "*.cluster.local.",
                "*.local."
            ]
        );
        assert_eq!(
            hostname(&n("Echo.NS.svc.cluster.local.")),
            "echo.ns.svc.cluster.local"
        );
    }
}
