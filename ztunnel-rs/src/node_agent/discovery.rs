//! Finding the network namespaces of pods that already run, for a node agent
//! that starts (or restarts) after its pods did: it learned their sandboxes
//! from CNI ADDs it never saw.
//!
//! Like upstream's node agent (istio/istio `cni/pkg/nodeagent/podcgroupns_linux.go`
//! `FindNetnsForPods`), every network namespace on the machine is a
//! candidate: those of the processes in `/proc/<pid>/ns/net`, and here also
//! the runtimes' bind mounts (`/run/netns`, `/var/run/netns`), which is where
//! the local cluster's pods live. The node's own namespace is never one.
//!
//! Upstream matches a process to a pod by the pod uid in its cgroup path and
//! then checks that the namespace holds one of the pod's addresses. Our
//! runtimes (the local cluster, the kube e2e node runtime) put no pod uid in
//! cgroups, and a pod without a process of its own has none to look at, so
//! the key is the pod's address (`status.podIPs`), which is unique among one
//! node's pods: a pod's namespace is the one holding one of its addresses.
//! When several namespaces hold it (pods of other nodes or other clusters
//! sharing the machine, as on a developer's laptop or in the local cluster),
//! these decide, in order:
//! - the namespace wired to this node: at the other end of one of the node
//!   namespace's links (the pod's veth, whatever the CNI does with the
//!   node's end), which the node namespace knows by a netns id;
//! - the namespace whose processes' cgroup names the pod uid (upstream's
//!   key).
//!
//! When that still leaves zero or several, the pod is not found and the
//! caller handles it fail-closed. A candidate found through `/proc` is named
//! by the oldest process in it (the sandbox's), as upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::debug;

use super::enrolment::PodKey;
use crate::inpod::Netns;

/// Where network namespaces are looked for.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// procfs of the machine's pid namespace (`/proc`; a host mount when the
    /// agent runs in a container).
    pub proc_dir: PathBuf,
    /// Directories of namespace bind mounts (`ip netns`, container runtimes).
    pub netns_dirs: Vec<PathBuf>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            proc_dir: PathBuf::from("/proc"),
            netns_dirs: vec![PathBuf::from("/run/netns"), PathBuf::from("/var/run/netns")],
        }
    }
}

/// A pod whose namespace is looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedPod {
    pub key: PodKey,
    pub uid: String,
    pub ips: Vec<IpAddr>,
}

/// The namespace found for a pod, and the path it was found at.
#[derive(Clone, Debug)]
pub struct FoundNetns {
    pub netns: Netns,
    pub path: PathBuf,
}

/// Why a pod's namespace was not found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "pod {0} has no address in the pod source (status.podIPs), so its network namespace cannot be recognised"
    )]
    NoAddress(PodKey),
    #[error("pod {pod}: no network namespace on this machine holds its address(es) {ips:?}")]
    NotFound { pod: PodKey, ips: Vec<IpAddr> },
    #[error(
        "pod {pod}: {} network namespaces hold its address(es) {ips:?}, and neither exactly one of them is wired to this node nor has a process with the pod's uid in its cgroup: {}",
        paths.len(),
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Ambiguous {
        pod: PodKey,
        ips: Vec<IpAddr>,
        paths: Vec<PathBuf>,
    },
}

/// A namespace on the machine.
#[derive(Debug)]
struct Candidate {
    netns: Netns,
    /// A bind mount if there is one, else `/proc/<pid>/ns/net` of the
    /// oldest process seen in it.
    path: PathBuf,
    /// Start time of the process `path` names (`None`: a bind mount).
    oldest: Option<u64>,
    pids: Vec<u32>,
    ips: Vec<IpAddr>,
}

/// Where discovery runs: the node's namespace (its links tell which
/// namespaces are wired to it) and the namespaces that are never a pod's.
#[derive(Clone, Debug)]
pub struct Node {
    /// `None`: the calling thread's.
    pub netns: Option<Netns>,
    /// Inodes of namespaces that are not pods' (the node's, the agent's).
    pub exclude: Vec<u64>,
    /// The iproute2 binary that lists the node's links.
    pub ip: String,
}

/// Looks for the namespace of each of `wanted`. Blocking: it enters every
/// candidate namespace to list its addresses.
pub fn find(
    config: &DiscoveryConfig,
    node: &Node,
    wanted: &[WantedPod],
) -> Vec<(PodKey, Result<FoundNetns, DiscoveryError>)> {
    // Without an address no pod can be recognised: nothing to look at.
    let candidates = if wanted.iter().any(|p| !p.ips.is_empty()) {
        candidates(config, &node.exclude)
    } else {
        BTreeMap::new()
    };
    let mut holders: BTreeMap<IpAddr, Vec<u64>> = BTreeMap::new();
    for (inode, candidate) in &candidates {
        for ip in &candidate.ips {
            holders.entry(*ip).or_default().push(*inode);
        }
    }
    let shared = holders.values().any(|inodes| inodes.len() > 1);
    let wired = if shared {
        wired_to(node, &candidates)
    } else {
        BTreeSet::new()
    };
    wanted
        .iter()
        .map(|pod| {
            let found = match_pod(config, &candidates, &holders, &wired, pod);
            (pod.key.clone(), found)
        })
        .collect()
}

/// The candidates (inodes) at the other end of one of the node's links.
fn wired_to(node: &Node, candidates: &BTreeMap<u64, Candidate>) -> BTreeSet<u64> {
    let look = || -> Result<BTreeSet<u64>, String> {
        // Listing the links makes the kernel give each peer namespace an
        // id in the node's namespace; then each candidate's id is asked.
        let listed = std::process::Command::new(&node.ip)
            .args(["-j", "link", "show"])
            .output()
            .map_err(|e| format!("{}: {e}", node.ip))?;
        let peers = link_netnsids(&String::from_utf8_lossy(&listed.stdout));
        let mut wired = BTreeSet::new();
        for (inode, candidate) in candidates {
            match netnsid(&candidate.netns) {
                Ok(Some(id)) if peers.contains(&id) => {
                    wired.insert(*inode);
                }
                Ok(_) => {}
                Err(e) => debug!(path = %candidate.path.display(), error = %e, "no netns id"),
            }
        }
        Ok(wired)
    };
    let result = match &node.netns {
        Some(netns) => netns.run(look).map_err(|e| e.to_string()).and_then(|r| r),
        None => look(),
    };
    result.unwrap_or_else(|error| {
        debug!(%error, "cannot tell which namespaces are wired to the node");
        BTreeSet::new()
    })
}

fn match_pod(
    config: &DiscoveryConfig,
    candidates: &BTreeMap<u64, Candidate>,
    holders: &BTreeMap<IpAddr, Vec<u64>>,
    wired: &BTreeSet<u64>,
    pod: &WantedPod,
) -> Result<FoundNetns, DiscoveryError> {
    if pod.ips.is_empty() {
        return Err(DiscoveryError::NoAddress(pod.key.clone()));
    }
    let mut inodes: Vec<u64> = pod
        .ips
        .iter()
        .filter_map(|ip| holders.get(&ip.to_canonical()))
        .flatten()
        .copied()
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    if inodes.len() > 1 {
        let on_node: Vec<u64> = inodes
            .iter()
            .copied()
            .filter(|i| wired.contains(i))
            .collect();
        if on_node.len() == 1 {
            inodes = on_node;
        }
    }
    if inodes.len() > 1 {
        let by_uid: Vec<u64> = inodes
            .iter()
            .copied()
            .filter(|inode| {
                candidates[inode].pids.iter().any(|pid| {
                    let cgroup = std::fs::read_to_string(
                        config.proc_dir.join(pid.to_string()).join("cgroup"),
                    )
                    .unwrap_or_default();
                    pod_uid_from_cgroup(&cgroup)
                        .is_some_and(|uid| uid.eq_ignore_ascii_case(&pod.uid))
                })
            })
            .collect();
        if by_uid.len() == 1 {
            inodes = by_uid;
        }
    }
    match inodes.as_slice() {
        [] => Err(DiscoveryError::NotFound {
            pod: pod.key.clone(),
            ips: pod.ips.clone(),
        }),
        [inode] => {
            let c = &candidates[inode];
            Ok(FoundNetns {
                netns: c.netns.clone(),
                path: c.path.clone(),
            })
        }
        several => Err(DiscoveryError::Ambiguous {
            pod: pod.key.clone(),
            ips: pod.ips.clone(),
            paths: several.iter().map(|i| candidates[i].path.clone()).collect(),
        }),
    }
}

/// The `link_netnsid`s in `ip -j link show` output: the ids of the
/// namespaces the links' other ends live in.
pub fn link_netnsids(json: &str) -> BTreeSet<i64> {
    let links: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_default();
    links
        .iter()
        .filter_map(|link| link.get("link_netnsid")?.as_i64())
        .collect()
}

const RTM_NEWNSID: u16 = 88;
const RTM_GETNSID: u16 = 90;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;

/// The id the calling thread's namespace gives `netns` (`RTM_GETNSID`);
/// `None` when it has given it none.
fn netnsid(netns: &Netns) -> std::io::Result<Option<i64>> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    let socket = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let fd = u32::try_from(netns.as_fd().as_raw_fd()).map_err(std::io::Error::other)?;
    sendto(
        socket.as_raw_fd(),
        &nsid_request(fd),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut reply = [0u8; 512];
    let n = recv(socket.as_raw_fd(), &mut reply, MsgFlags::empty())?;
    parse_nsid_reply(&reply[..n])
}

/// `nlmsghdr` + `rtgenmsg` (AF_UNSPEC, padded) + `NETNSA_FD`.
fn nsid_request(fd: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&28u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_GETNSID.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&NETNSA_FD.to_ne_bytes());
    msg.extend_from_slice(&fd.to_ne_bytes());
    msg
}

fn parse_nsid_reply(reply: &[u8]) -> std::io::Result<Option<i64>> {
    let bad = || std::io::Error::other("a netlink reply too short for its kind");
    let u16_at = |at: usize| -> std::io::Result<u16> {
        Ok(u16::from_ne_bytes(
            reply
                .get(at..at + 2)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    let i32_at = |at: usize| -> std::io::Result<i32> {
        Ok(i32::from_ne_bytes(
            reply
                .get(at..at + 4)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ))
    };
    match u16_at(4)? {
        NLMSG_ERROR => Err(std::io::Error::from_raw_os_error(-i32_at(16)?)),
        RTM_NEWNSID => {
            // Attributes follow the header (16) and the padded rtgenmsg (4).
            let mut at = 20;
            while at + 4 <= reply.len() {
                let len = usize::from(u16_at(at)?);
                if len < 4 {
                    break;
                }
                if u16_at(at + 2)? == NETNSA_NSID {
                    let id = i32_at(at + 4)?;
                    return Ok((id >= 0).then_some(i64::from(id)));
                }
                at += len.div_ceil(4) * 4;
            }
            Ok(None)
        }
        other => Err(std::io::Error::other(format!(
            "unexpected netlink message type {other}"
        ))),
    }
}

/// Every namespace on the machine but `exclude`, with its addresses.
fn candidates(config: &DiscoveryConfig, exclude: &[u64]) -> BTreeMap<u64, Candidate> {
    let mut found: BTreeMap<u64, Candidate> = BTreeMap::new();
    for dir in &config.netns_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Not every file there is a mounted namespace (a runtime may be
            // half way through creating one): those do not open as one.
            let Ok(netns) = Netns::open(&path) else {
                continue;
            };
            if exclude.contains(&netns.inode()) {
                continue;
            }
            found.entry(netns.inode()).or_insert(Candidate {
                netns,
                path,
                oldest: None,
                pids: Vec::new(),
                ips: Vec::new(),
            });
        }
    }
    let pids = std::fs::read_dir(&config.proc_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids {
        let dir = config.proc_dir.join(pid.to_string());
        let path = dir.join("ns").join("net");
        // Processes come and go while we look: any of these may fail. The
        // link's target is the namespace itself (an nsfs inode).
        let Ok(inode) = std::fs::metadata(&path).map(|m| m.ino()) else {
            continue;
        };
        if exclude.contains(&inode) {
            continue;
        }
        let started = start_time(&dir);
        match found.get_mut(&inode) {
            Some(c) => {
                c.pids.push(pid);
                if let (Some(oldest), Some(started)) = (c.oldest, started)
                    && started < oldest
                {
                    c.oldest = Some(started);
                    c.path = path;
                }
            }
            None => {
                let Ok(netns) = Netns::open(&path) else {
                    continue;
                };
                if netns.inode() != inode {
                    continue;
                }
                found.insert(
                    inode,
                    Candidate {
                        netns,
                        path,
                        oldest: Some(started.unwrap_or(u64::MAX)),
                        pids: vec![pid],
                        ips: Vec::new(),
                    },
                );
            }
        }
    }
    for candidate in found.values_mut() {
        match candidate.netns.run(addresses) {
            Ok(Ok(ips)) => candidate.ips = ips,
            Ok(Err(e)) => {
                debug!(path = %candidate.path.display(), error = %e, "cannot list addresses")
            }
            Err(e) => debug!(path = %candidate.path.display(), error = %e, "cannot enter"),
        }
    }
    found
}

/// The addresses of the calling thread's network namespace.
fn addresses() -> Result<Vec<IpAddr>, nix::Error> {
    let mut ips: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifaddr| {
            let address = ifaddr.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// A process's start time (clock ticks since boot, `stat` field 22).
fn start_time(proc_pid: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_pid.join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The pod uid in a process's `/proc/<pid>/cgroup`, in the shapes container
/// runtimes write it (`…/kubepods/burstable/pod<uid>/<container>`,
/// `…kubepods-besteffort-pod<uid with _>.slice…`): `pod` after a
/// punctuation character, then 8-4-4-4-12 hex digits whose groups may be
/// separated by one punctuation character, then punctuation. Returned with
/// dashes, as Kubernetes writes uids.
pub fn pod_uid_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(pod_uid_in_path)
}

fn pod_uid_in_path(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    path.match_indices("pod")
        .filter(|(at, _)| *at > 0 && bytes[at - 1].is_ascii_punctuation())
        .find_map(|(at, _)| uid_at(&bytes[at + 3..]))
}

fn uid_at(bytes: &[u8]) -> Option<String> {
    let mut uid = String::with_capacity(36);
    let mut i = 0;
    for (group, len) in [8, 4, 4, 4, 12].into_iter().enumerate() {
        if group > 0 {
            if bytes.get(i).is_some_and(u8::is_ascii_punctuation) {
                i += 1;
            }
            uid.push('-');
        }
        for _ in 0..len {
            let digit = *bytes.get(i).filter(|b| b.is_ascii_hexdigit())?;
            uid.push(char::from(digit));
            i += 1;
        }
    }
    bytes
        .get(i)
        .is_some_and(u8::is_ascii_punctuation)
        .then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_namespaces_of_their_peers() {
        let json = r#"[{"ifindex":1,"ifname":"lo","link_type":"loopback"},
            {"ifindex":5,"link_index":2,"ifname":"veth5","link_netnsid":3},
            {"ifindex":6,"link_index":2,"ifname":"veth6","link_netnsid":0}]"#;
        assert_eq!(link_netnsids(json), BTreeSet::from([0, 3]));
        assert!(link_netnsids("not json").is_empty());
    }

    #[test]
    fn nsid_replies_are_parsed() {
        let request = nsid_request(7);
        assert_eq!(request.len(), 28);
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().unwrap()), 28);
        // RTM_NEWNSID with NETNSA_NSID = 4.
        let mut reply = Vec::new();
        reply.extend_from_slice(&28u32.to_ne_bytes());
        reply.extend_from_slice(&RTM_NEWNSID.to_ne_bytes());
        reply.extend_from_slice(&[0; 10]);
        reply.extend_from_slice(&[0; 4]);
        reply.extend_from_slice(&8u16.to_ne_bytes());
        reply.extend_from_slice(&NETNSA_NSID.to_ne_bytes());
        reply.extend_from_slice(&4i32.to_ne_bytes());
        assert_eq!(parse_nsid_reply(&reply).unwrap(), Some(4));
        // Not assigned: -1.
        reply[24..28].copy_from_slice(&(-1i32).to_ne_bytes());
        assert_eq!(parse_nsid_reply(&reply).unwrap(), None);
        // An error reply carries -errno.
        let mut error = Vec::new();
        error.extend_from_slice(&36u32.to_ne_bytes());
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-22i32).to_ne_bytes());
        assert_eq!(
            parse_nsid_reply(&error).unwrap_err().raw_os_error(),
            Some(22)
        );
    }

    #[test]
    fn pod_uids_are_read_from_the_cgroup_shapes_runtimes_write() {
        let cases = [
            (
                "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961",
                Some("2c48913c-b29f-11e7-9350-020968147796"),
            ),
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/docker-9bca8d63d5fa.scope",
                Some("2c48913c-b29f-11e7-9350-020968147796"),
            ),
            (
                "12:pids:/kubepods-besteffort-pod72f7f152_440c_66ac_9084_e0fc1d8a910c.slice:cri-containerd:b2a102854b49",
                Some("72f7f152-440c-66ac-9084-e0fc1d8a910c"),
            ),
            // No uid: a crio path, a plain session, a "pod" word that is not one.
            (
                "0::/../crio-45490e76e0878aaa4d9808f7d2eefba37f093c3efbba9838b6d8ab804d9bd814.scope",
                None,
            ),
            ("0::/user.slice/user-0.slice/session-1.scope", None),
            ("0::/system.slice/podman.service", None),
            // Too short to be a uid.
            ("0::/kubepods/pod2c48913c-b29f-11e7/abc", None),
        ];
        for (cgroup, want) in cases {
            assert_eq!(pod_uid_from_cgroup(cgroup).as_deref(), want, "{cgroup}");
        }
    }
}
