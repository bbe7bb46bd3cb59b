//! resolv.conf (resolv.conf(5)) as a stub resolver reads it: the
//! nameservers, the search list and `ndots`; and the names such a resolver
//! asks, in order, for one name an application gives it. Shared by
//! ztunnel-rs (its upstream resolvers and on-demand lookups) and the e2e
//! sample client (which resolves as an application in a pod would), so
//! both read the file the same way.
//!
//! Read as glibc reads it: a line starting with `#` or `;` is a comment;
//! the last `search` or `domain` line sets the list; `options ndots:N`
//! (capped at 15, default 1). Keywords this reader has no use for
//! (`sortlist`, other options) are skipped; a line it cannot use
//! (a `nameserver` that is not an IP address, a bad `ndots`, a search
//! domain that is not a DNS name) is skipped and reported as a
//! [`Problem`] naming the line and field, for the caller to log.

use std::fmt;
use std::net::IpAddr;

/// `ndots` when the file does not set it.
pub const DEFAULT_NDOTS: u8 = 1;
/// The largest `ndots` honoured; larger values are taken as this one.
pub const MAX_NDOTS: u8 = 15;

/// The search list and when it applies first.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SearchList {
    /// Domains appended to a relative name, in order, without a trailing dot.
    pub domains: Vec<String>,
    /// A name with fewer dots than this tries the search domains first.
    pub ndots: u8,
}

impl Default for SearchList {
    fn default() -> Self {
        SearchList {
            domains: Vec::new(),
            ndots: DEFAULT_NDOTS,
        }
    }
}

impl SearchList {
    /// The fully qualified names (each with a trailing dot) a stub resolver
    /// asks for `name`, in order, until one has an answer: a name ending in
    /// `.` is absolute and asked alone; a name with at least `ndots` dots is
    /// asked as written first, then with each search domain; a name with
    /// fewer is asked with each search domain first, then as written.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        if name.is_empty() || name.ends_with('.') {
            return vec![if name.is_empty() {
                ".".into()
            } else {
                name.into()
            }];
        }
        let as_written = format!("{name}.");
        let searched = self.domains.iter().map(|d| format!("{name}.{d}."));
        let dots = name.matches('.').count();
        if dots >= usize::from(self.ndots) {
            std::iter::once(as_written).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(as_written)).collect()
        }
    }
}

/// What a resolv.conf says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, in order (an IPv6 zone such as `%eth0` dropped).
    pub nameservers: Vec<IpAddr>,
    pub search: SearchList,
}

/// A line (or part of one) that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: usize,
    /// The keyword or option: `nameserver`, `search`, `domain`, `ndots`.
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.reason)
    }
}

impl ResolvConf {
    /// Reads the text of a resolv.conf; what cannot be used is skipped and
    /// returned as problems.
    pub fn parse(text: &str) -> (ResolvConf, Vec<Problem>) {
        let mut conf = ResolvConf::default();
        let mut problems = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let mut problem = |field, reason: String| {
                problems.push(Problem {
                    line: line_no,
                    field,
                    reason,
                })
            };
            let trimmed = line.trim_start();
            if trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            let mut words = trimmed.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword {
                "nameserver" => match words.next() {
                    None => problem("nameserver", "no address".into()),
                    Some(address) => {
                        let ip = address.split('%').next().unwrap_or(address);
                        match ip.parse::<IpAddr>() {
                            Ok(ip) => conf.nameservers.push(ip),
                            Err(_) => {
                                problem("nameserver", format!("{address:?} is not an IP address"))
                            }
                        }
                    }
                },
                "search" | "domain" => {
                    let field = if keyword == "search" {
                        "search"
                    } else {
                        "domain"
                    };
                    let mut domains = Vec::new();
                    for word in words {
                        match domain(word) {
                            Ok(Some(d)) => domains.push(d),
                            Ok(None) => {}
                            Err(reason) => problem(field, reason),
                        }
                        if keyword == "domain" {
                            break;
                        }
                    }
                    conf.search.domains = domains;
                }
                "options" => {
                    for option in words {
                        let Some(value) = option.strip_prefix("ndots:") else {
                            continue;
                        };
                        match value.parse::<u32>() {
                            Ok(n) => {
                                conf.search.ndots =
                                    u8::try_from(n.min(u32::from(MAX_NDOTS))).unwrap_or(MAX_NDOTS)
                            }
                            Err(_) => {
                                problem("ndots", format!("{value:?} is not a non-negative integer"))
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        (conf, problems)
    }
}

/// A search domain without its trailing dot; `.` (the root) is no domain.
fn domain(word: &str) -> Result<Option<String>, String> {
    let d = word.strip_suffix('.').unwrap_or(word);
    if d.is_empty() {
        return Ok(None);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if d.len() > 253 || !d.split('.').all(label_ok) {
        return Err(format!("{word:?} is not a DNS name"));
    }
    Ok(Some(d.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(domains: &[&str], ndots: u8) -> SearchList {
        SearchList {
            domains: domains.iter().map(|d| d.to_string()).collect(),
            ndots,
        }
    }

    #[test]
    fn kubernetes_pod_file_is_read_whole() {
        let (conf, problems) = ResolvConf::parse(
            "# written by the kubelet\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\n\
             nameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5 timeout:2\n",
        );
        assert_eq!(problems, []);
        assert_eq!(
            conf.nameservers,
            [
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(
            conf.search,
            list(
                &[
                    "demo.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local"
                ],
                5
            )
        );
    }

    #[test]
    fn bad_lines_are_skipped_and_named() {
        let (conf, problems) = ResolvConf::parse(
            "nameserver not-an-ip\nnameserver\nsearch good.example bad..example ok.\n\
             options ndots:x\nsortlist 10.0.0.0/8\n; comment\nnameserver 192.0.2.1\n",
        );
        assert_eq!(conf.nameservers, ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(conf.search, list(&["good.example", "ok"], DEFAULT_NDOTS));
        let named: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.field)).collect();
        assert_eq!(
            named,
            [
                (1, "nameserver"),
                (2, "nameserver"),
                (3, "search"),
                (4, "ndots")
            ]
        );
        assert!(
            problems[0].to_string().contains("\"not-an-ip\""),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn last_search_or_domain_line_wins_and_ndots_is_capped() {
        let (conf, _) =
            ResolvConf::parse("search a.example b.example\ndomain c.example\noptions ndots:40\n");
        assert_eq!(conf.search, list(&["c.example"], MAX_NDOTS));
    }

    #[test]
    fn short_names_try_the_search_domains_first() {
        let search = list(&["demo.svc.cluster.local", "svc.cluster.local"], 5);
        assert_eq!(
            search.candidates("echo.demo"),
            [
                "echo.demo.demo.svc.cluster.local.",
                "echo.demo.svc.cluster.local.",
                "echo.demo."
            ]
        );
    }

    #[test]
    fn names_with_ndots_dots_are_asked_as_written_first() {
        let search = list(&["example.org"], 2);
        assert_eq!(
            search.candidates("api.example.com"),
            ["api.example.com.", "api.example.com.example.org."]
        );
        assert_eq!(
            search.candidates("api.test"),
            ["api.test.example.org.", "api.test."]
        );
    }

    #[test]
    fn a_trailing_dot_is_absolute() {
        let search = list(&["example.org"], 5);
        assert_eq!(search.candidates("api.example.com."), ["api.example.com."]);
    }

    #[test]
    fn without_a_search_list_the_name_is_asked_alone() {
        assert_eq!(SearchList::default().candidates("echo"), ["echo."]);
    }
}
