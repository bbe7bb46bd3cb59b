//! The local cluster's network: a fabric namespace holding a bridge (the
//! "switch" between machines), a namespace per node and one for the control
//! plane, each with a veth into the bridge and an address on the fabric
//! subnet, and a namespace per pod with a veth into its node.
//!
//! Routing is plain L3, as a simple Kubernetes CNI would do it: a pod has a
//! /32 address and a default route via its node's gateway address; a node
//! forwards, routes each of its pods' /32 to the pod's veth, and routes every
//! other node's pod range via that node's fabric address. So pod-to-pod
//! traffic across nodes travels pod -> node -> bridge -> node -> pod, and
//! nothing touches the host's own network namespace. Interfaces are created
//! inside our namespaces only, so their names cannot clash with anything.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::netns::NetNs;
use crate::run::{Run, RunError};
use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("node {node}: no free address left in pod range {range}")]
    PodRangeFull { node: String, range: Ipv4Net },
    #[error("{requested} nodes asked for; the address plan has room for 1 to {max}")]
    NodeCount { requested: usize, max: usize },
}

/// Which addresses go where. Every address lives inside our namespaces, so
/// the ranges cannot collide with the host's; they are still picked away
/// from common defaults so a human reading `ip addr` is not confused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPlan {
    /// The fabric subnet: control plane and nodes.
    pub fabric: Ipv4Net,
    /// Pod ranges are carved from this as one /24 per node.
    pub pod_supernet: Ipv4Net,
    /// Service cluster IPs (allocated by the local cluster, served by ztunnel).
    pub service_range: Ipv4Net,
}

impl Default for AddressPlan {
    fn default() -> Self {
        AddressPlan {
            fabric: "172.30.0.0/24".parse().expect("valid"),
            pod_supernet: "10.244.0.0/16".parse().expect("valid"),
            service_range: "10.96.0.0/16".parse().expect("valid"),
        }
    }
}

/// First host number of nodes on the fabric (`.2` is the control plane).
const FIRST_NODE_HOST: u32 = 10;

impl AddressPlan {
    /// The most nodes the plan has addresses for.
    pub fn max_nodes(&self) -> usize {
        let fabric_room = (self.fabric.hosts().count() as u32).saturating_sub(FIRST_NODE_HOST);
        let pod_room = 1u32 << 24u8.saturating_sub(self.pod_supernet.prefix_len()).min(16);
        fabric_room.min(pod_room) as usize
    }

    /// The control plane's address on the fabric.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        nth(self.fabric, 2)
    }

    /// Node `i`'s address on the fabric.
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        nth(self.fabric, FIRST_NODE_HOST + i as u32)
    }

    /// Node `i`'s pod range (a /24).
    pub fn pod_range(&self, i: usize) -> Ipv4Net {
        let base = nth(self.pod_supernet, (i as u32) << 8);
        Ipv4Net::new(base, 24).expect("a /24 is valid")
    }

    /// The address pods on node `i` use as their gateway (held by the node).
    pub fn pod_gateway(&self, i: usize) -> Ipv4Addr {
        nth(self.pod_range(i), 1)
    }

    /// The address of ztunnel-rs pod `slot` (`0..ZTUNNEL_SLOTS`) on node
    /// `i`: the top of the node's pod range, which [`PodAddressPool`] never
    /// hands out. Two slots, because a rolling update (maxSurge 1) runs the
    /// new ztunnel beside the old one.
    pub fn ztunnel_ip(&self, i: usize, slot: usize) -> Ipv4Addr {
        let range = self.pod_range(i);
        let top = u32::from(range.broadcast()) - u32::from(range.network()) - 1;
        nth(range, top - slot as u32)
    }
}

/// How many ztunnel-rs pods a node can run at once (the old one draining and
/// the new one), each at [`AddressPlan::ztunnel_ip`].
pub const ZTUNNEL_SLOTS: usize = 2;

fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Hands out pod addresses of one node's range, reusing freed ones.
#[derive(Clone, Debug)]
pub struct PodAddressPool {
    range: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
}

impl PodAddressPool {
    pub fn new(range: Ipv4Net) -> Self {
        PodAddressPool {
            range,
            used: BTreeSet::new(),
        }
    }

    /// The lowest free address from `.2` up (`.1` is the gateway; the
    /// top [`ZTUNNEL_SLOTS`] are the ztunnel-rs pods').
    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        let hosts = self.range.hosts().count();
        let ip = self
            .range
            .hosts()
            .take(hosts.saturating_sub(ZTUNNEL_SLOTS))
            .skip(1)
            .find(|ip| !self.used.contains(ip))?;
        self.used.insert(ip);
        Some(ip)
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }
}

/// A node: a namespace on the fabric, with its pods behind it.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub index: usize,
    pub netns: NetNs,
    pub ip: Ipv4Addr,
    pub pod_range: Ipv4Net,
    pub pod_gateway: Ipv4Addr,
}

/// A pod's network: its namespace, address, and the veth on its node.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    pub netns: NetNs,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub node: usize,
    /// The node-side end of the pod's veth (inside the node namespace).
    pub host_veth: String,
}

impl PodNetwork {
    /// The pod's address as CNI reports it (`/32`: the pod routes everything via its gateway).
    pub fn cidr(&self) -> String {
        format!("{}/32", self.ip)
    }
}

/// The built network. Holds no resources itself: the [`Run`] owns the
/// namespaces and removes them.
#[derive(Debug)]
pub struct Topology {
    pub plan: AddressPlan,
    pub fabric: NetNs,
    pub control_plane: NetNs,
    pub nodes: Vec<Node>,
}

/// The bridge inside the fabric namespace.
const BRIDGE: &str = "br0";
/// Every member's (and pod's) interface towards the outside.
pub const UPLINK: &str = "eth0";

impl Topology {
    /// Builds the fabric, the control-plane namespace and `nodes` nodes named `node0`, `node1`, ...
    pub fn build(run: &Run, nodes: usize, plan: AddressPlan) -> Result<Topology, TopologyError> {
        if nodes == 0 || nodes > plan.max_nodes() {
            return Err(TopologyError::NodeCount {
                requested: nodes,
                max: plan.max_nodes(),
            });
        }
        let fabric = run.create_netns("fabric")?;
        fabric.ip_batch(&[
            format!("link add {BRIDGE} type bridge"),
            format!("link set {BRIDGE} up"),
        ])?;

        let control_plane = run.create_netns("control-plane")?;
        attach(
            &fabric,
            &control_plane,
            "cp",
            plan.control_plane_ip(),
            plan.fabric,
        )?;

        let mut built = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let name = format!("node{i}");
            let netns = run.create_netns(&name)?;
            attach(
                &fabric,
                &netns,
                &format!("n{i}"),
                plan.node_ip(i),
                plan.fabric,
            )?;
            netns.sysctl("net/ipv4/ip_forward", "1")?;
            built.push(Node {
                name,
                index: i,
                netns,
                ip: plan.node_ip(i),
                pod_range: plan.pod_range(i),
                pod_gateway: plan.pod_gateway(i),
            });
        }

        // Every member reaches every node's pods through that node.
        let members = std::iter::once((None, &control_plane))
            .chain(built.iter().map(|n| (Some(n.index), &n.netns)));
        for (me, ns) in members {
            let routes: Vec<String> = built
                .iter()
                .filter(|n| Some(n.index) != me)
                .map(|n| format!("route add {} via {} dev {UPLINK}", n.pod_range, n.ip))
                .collect();
            if !routes.is_empty() {
                ns.ip_batch(&routes)?;
            }
        }
        Ok(Topology {
            plan,
            fabric,
            control_plane,
            nodes: built,
        })
    }

    /// Creates a pod's namespace (role `role` in the run) wired to node
    /// `node` with address `ip` (from that node's [`PodAddressPool`]).
    pub fn add_pod(
        &self,
        run: &Run,
        node: usize,
        role: &str,
        ip: Ipv4Addr,
    ) -> Result<PodNetwork, TopologyError> {
        self.nodes[node].add_pod(run, role, ip)
    }

    /// Removes a pod's veth and namespace.
    pub fn remove_pod(&self, run: &Run, pod: &PodNetwork) -> Result<(), TopologyError> {
        self.nodes[pod.node].remove_pod(run, pod)
    }
}

impl Node {
    /// Creates a pod's namespace (role `role` in the run) wired to this
    /// node with address `ip` (from its [`PodAddressPool`], or a ztunnel
    /// pod's [`AddressPlan::ztunnel_ip`]).
    pub fn add_pod(
        &self,
        run: &Run,
        role: &str,
        ip: Ipv4Addr,
    ) -> Result<PodNetwork, TopologyError> {
        let n = self;
        let netns = run.create_netns(role)?;
        let host_veth = format!("veth{}", ip.octets()[3]);
        let wired = n
            .netns
            .ip_batch(&[
                format!(
                    "link add {host_veth} type veth peer name {UPLINK} netns {}",
                    netns.name()
                ),
                format!("addr add {}/32 dev {host_veth}", n.pod_gateway),
                format!("link set {host_veth} up"),
                format!("route add {ip}/32 dev {host_veth}"),
            ])
            .and_then(|()| {
                netns.ip_batch(&[
                    format!("addr add {ip}/32 dev {UPLINK}"),
                    format!("link set {UPLINK} up"),
                    format!("route add {} dev {UPLINK} scope link", n.pod_gateway),
                    format!("route add default via {} dev {UPLINK}", n.pod_gateway),
                ])
            });
        if let Err(e) = wired {
            let _ = run.delete_netns(&netns);
            return Err(e.into());
        }
        Ok(PodNetwork {
            netns,
            ip,
            gateway: n.pod_gateway,
            node: n.index,
            host_veth,
        })
    }

    /// Removes a pod's veth and namespace.
    pub fn remove_pod(&self, run: &Run, pod: &PodNetwork) -> Result<(), TopologyError> {
        // The kernel frees a deleted namespace (and the veth end inside it)
        // asynchronously; deleting the node's end removes the pair now, so
        // the name and address can be reused at once.
        // (It is already gone if the pod's wiring failed half way.)
        let _ = self.netns.ip(&["link", "del", &pod.host_veth]);
        run.delete_netns(&pod.netns)?;
        Ok(())
    }
}

/// Plugs `member` into the fabric bridge with `ip` on its uplink.
fn attach(
    fabric: &NetNs,
    member: &NetNs,
    port: &str,
    ip: Ipv4Addr,
    subnet: Ipv4Net,
) -> Result<(), TopologyError> {
    member.ip_batch(&[
        format!(
            "link add {UPLINK} type veth peer name {port} netns {}",
            fabric.name()
        ),
        format!("addr add {ip}/{} dev {UPLINK}", subnet.prefix_len()),
        format!("link set {UPLINK} up"),
    ])?;
    fabric.ip_batch(&[
        format!("link set {port} master {BRIDGE}"),
        format!("link set {port} up"),
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_gives_each_node_its_own_ranges() {
        let plan = AddressPlan::default();
        assert_eq!(plan.control_plane_ip(), Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(plan.node_ip(0), Ipv4Addr::new(172, 30, 0, 10));
        assert_eq!(plan.node_ip(1), Ipv4Addr::new(172, 30, 0, 11));
        assert_eq!(plan.pod_range(0).to_string(), "10.244.0.0/24");
        assert_eq!(plan.pod_range(3).to_string(), "10.244.3.0/24");
        assert_eq!(plan.pod_gateway(3), Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(plan.max_nodes(), 244);
        assert!(!plan.fabric.contains(&plan.pod_range(0).network()));
        assert!(!plan.service_range.contains(&plan.pod_range(0).network()));
    }

    #[test]
    fn pod_addresses_skip_the_gateway_and_are_reused() {
        let mut pool = PodAddressPool::new("10.244.1.0/24".parse().unwrap());
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(b, Ipv4Addr::new(10, 244, 1, 3));
        pool.release(a);
        assert_eq!(pool.allocate(), Some(a));
        let mut n = 2;
        let mut last = b;
        while let Some(ip) = pool.allocate() {
            n += 1;
            last = ip;
        }
        assert_eq!(n, 251, ".2 to .252: .253 and .254 are the ztunnel pods'");
        assert_eq!(last, Ipv4Addr::new(10, 244, 1, 252));
    }

    #[test]
    fn ztunnel_pods_have_the_top_of_their_node_range() {
        let plan = AddressPlan::default();
        let slots: Vec<Ipv4Addr> = (0..ZTUNNEL_SLOTS).map(|s| plan.ztunnel_ip(1, s)).collect();
        assert_eq!(
            slots,
            [
                Ipv4Addr::new(10, 244, 1, 254),
                Ipv4Addr::new(10, 244, 1, 253)
            ]
        );
    }
}
