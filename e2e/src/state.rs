//! The local cluster's state, as the API server and its controllers would
//! hold it: nodes, namespaces (each with its `default` ServiceAccount), pods
//! with their node, address and readiness, services with cluster IPs from the
//! service range, the EndpointSlices an endpoint controller would derive from
//! them, and whatever else was applied (policies, gateways, routes).
//!
//! Pure: no I/O. [`ClusterState::render`] gives every object as a YAML
//! document keyed by file name; the config directory writer puts them on
//! disk for `istiod-rs --config-dir`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::objects::{Object, ObjectError, ObjectKey};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(
        "{0}: pods are made with Cluster::create_pod, which builds the pod's network namespace \
         and starts its process; a Pod object alone would have neither"
    )]
    PodApplied(ObjectKey),
    #[error("{0}: namespace {1:?} does not exist; apply the Namespace first")]
    NoNamespace(String, String),
    #[error(
        "pod {namespace}/{name}: service account {sa:?} does not exist in {namespace}; apply it first"
    )]
    NoServiceAccount {
        namespace: String,
        name: String,
        sa: String,
    },
    #[error("pod {0}/{1} already exists")]
    PodExists(String, String),
    #[error("pod {0}/{1} does not exist")]
    NoPod(String, String),
    #[error("namespace {0} still has pods ({1}); delete them first")]
    NamespaceInUse(String, String),
    #[error("{key}: spec.clusterIP {ip}: {problem}")]
    ClusterIp {
        key: ObjectKey,
        ip: String,
        problem: String,
    },
    #[error("{key}: {field}: {problem}")]
    Invalid {
        key: ObjectKey,
        field: &'static str,
        problem: String,
    },
    #[error("the service range {0} is exhausted")]
    ServiceRangeFull(Ipv4Net),
}

/// A pod as the local cluster runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub node_ip: Ipv4Addr,
    /// Set once the pod's network exists (as the kubelet reports it).
    pub ip: Option<Ipv4Addr>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Named container ports (for services whose targetPort is a name).
    pub ports: Vec<(String, u16)>,
    /// The command, for the record (the container's `command`).
    pub command: Vec<String>,
    /// The container's `readinessProbe`, when the pod has one of its own.
    pub readiness: Option<crate::cluster::ReadinessProbe>,
    pub ready: bool,
    pub terminating: bool,
    pub created: Timestamp,
}

impl PodRecord {
    /// The Pod object the API server would hold for this pod.
    pub fn to_pod(&self) -> core::Pod {
        let condition = |type_: &str, ok: bool| core::PodCondition {
            type_: type_.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            ..Default::default()
        };
        let running = self.ip.is_some();
        core::Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                uid: Some(self.uid.clone()),
                labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                creation_timestamp: Some(Time(self.created)),
                deletion_timestamp: self.terminating.then(|| Time(Timestamp::now())),
                ..Default::default()
            },
            spec: Some(core::PodSpec {
                node_name: Some(self.node.clone()),
                service_account_name: Some(self.service_account.clone()),
                containers: vec![core::Container {
                    name: "app".into(),
                    image: Some("local/e2e-app".into()),
                    command: (!self.command.is_empty()).then(|| self.command.clone()),
                    readiness_probe: self.readiness.as_ref().map(readiness_probe),
                    ports: (!self.ports.is_empty()).then(|| {
                        self.ports
                            .iter()
                            .map(|(name, port)| core::ContainerPort {
                                name: (!name.is_empty()).then(|| name.clone()),
                                container_port: i32::from(*port),
                                protocol: Some("TCP".into()),
                                ..Default::default()
                            })
                            .collect()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(core::PodStatus {
                phase: Some(if running { "Running" } else { "Pending" }.into()),
                host_ip: Some(self.node_ip.to_string()),
                host_ips: Some(vec![core::HostIP {
                    ip: self.node_ip.to_string(),
                }]),
                pod_ip: self.ip.map(|ip| ip.to_string()),
                pod_ips: self.ip.map(|ip| vec![core::PodIP { ip: ip.to_string() }]),
                conditions: Some(vec![
                    condition("PodScheduled", true),
                    condition("Initialized", running),
                    condition("ContainersReady", self.ready && !self.terminating),
                    condition("Ready", self.ready && !self.terminating),
                ]),
                ..Default::default()
            }),
        }
    }
}

/// A readiness probe as a container spec holds it.
fn readiness_probe(probe: &crate::cluster::ReadinessProbe) -> core::Probe {
    use crate::cluster::ReadinessProbe;
    match probe {
        ReadinessProbe::Tcp { port } => core::Probe {
            tcp_socket: Some(core::TCPSocketAction {
                port: IntOrString::Int(i32::from(*port)),
                ..Default::default()
            }),
            ..Default::default()
        },
        ReadinessProbe::HttpGet { port, path } => core::Probe {
            http_get: Some(core::HTTPGetAction {
                port: IntOrString::Int(i32::from(*port)),
                path: Some(path.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// A node as written into the cluster state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub ip: Ipv4Addr,
    pub pod_range: Ipv4Net,
    /// Labels applied to the node (`kubernetes.io/hostname` is always there
    /// besides).
    pub labels: BTreeMap<String, String>,
}

impl NodeRecord {
    pub fn to_node(&self) -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some({
                    let mut labels = self.labels.clone();
                    labels.insert(HOSTNAME_LABEL.to_string(), self.name.clone());
                    labels
                }),
                ..Default::default()
            },
            spec: Some(core::NodeSpec {
                pod_cidr: Some(self.pod_range.to_string()),
                pod_cidrs: Some(vec![self.pod_range.to_string()]),
                ..Default::default()
            }),
            status: Some(core::NodeStatus {
                addresses: Some(vec![
                    core::NodeAddress {
                        type_: "InternalIP".into(),
                        address: self.ip.to_string(),
                    },
                    core::NodeAddress {
                        type_: "Hostname".into(),
                        address: self.name.clone(),
                    },
                ]),
                conditions: Some(vec![core::NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }
}

/// The label every node has, its name.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Label linking an EndpointSlice to its Service (as Kubernetes sets it).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The cluster state.
#[derive(Clone, Debug)]
pub struct ClusterState {
    nodes: Vec<NodeRecord>,
    objects: BTreeMap<ObjectKey, Object>,
    pods: BTreeMap<(String, String), PodRecord>,
    /// Objects istiod-rs provisions into the config directory's
    /// `generated/` (a waypoint's ServiceAccount...): they exist for the
    /// checks pods pass, but istiod-rs writes them, not [`ClusterState::render`].
    provisioned: BTreeSet<ObjectKey>,
    service_range: Ipv4Net,
}

impl ClusterState {
    /// A fresh cluster: the given nodes, and the namespaces every cluster has.
    pub fn new(nodes: Vec<NodeRecord>, service_range: Ipv4Net) -> ClusterState {
        let mut state = ClusterState {
            nodes,
            objects: BTreeMap::new(),
            pods: BTreeMap::new(),
            provisioned: BTreeSet::new(),
            service_range,
        };
        for ns in [
            "default",
            "kube-system",
            api::labels::DEFAULT_ROOT_NAMESPACE,
        ] {
            state
                .apply(namespace(ns, &BTreeMap::new()))
                .expect("built-in namespaces are valid");
        }
        state
    }

    pub fn nodes(&self) -> &[NodeRecord] {
        &self.nodes
    }

    pub fn has_namespace(&self, ns: &str) -> bool {
        self.objects
            .contains_key(&ObjectKey::core("Namespace", None, ns))
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    /// The applied objects of one kind, in key order.
    pub fn of_kind(&self, group: &str, kind: &str) -> Vec<Object> {
        self.objects
            .iter()
            .filter(|(k, _)| k.group == group && k.kind == kind)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Applies an object as `kubectl apply` would (whole-object replace).
    /// A Service gets a cluster IP from the service range unless it asks for
    /// one (or for `None`, headless), and keeps it across re-applies. A new
    /// Namespace gets its `default` ServiceAccount. A Node names one of the
    /// cluster's nodes, whose labels become the object's (as a server-side
    /// apply of labels by one field manager: labels applied before and
    /// left out are removed; `kubernetes.io/hostname` stays); the rest of
    /// the node is the cluster's. Returns the stored object.
    pub fn apply(&mut self, mut obj: Object) -> Result<Object, StateError> {
        let key = obj.key().clone();
        match (key.group.as_str(), key.kind.as_str()) {
            ("", "Pod") => return Err(StateError::PodApplied(key)),
            ("", "Node") => {
                let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
                let node = self
                    .nodes
                    .iter_mut()
                    .find(|n| n.name == key.name)
                    .ok_or_else(|| StateError::Invalid {
                        key: key.clone(),
                        field: "metadata.name",
                        problem: format!(
                            "the local cluster's nodes are fixed ({}); only their labels can be applied",
                            names.join(", ")
                        ),
                    })?;
                let mut labels = obj.labels();
                labels.remove(HOSTNAME_LABEL);
                node.labels = labels;
                return Ok(obj);
            }
            ("", "Namespace") => {
                let sa = ObjectKey::core("ServiceAccount", Some(&key.name), "default");
                self.objects
                    .entry(sa)
                    .or_insert_with(|| service_account(&key.name, "default"));
            }
            (_, "Namespace") | (_, "Node") => {}
            _ => {
                let ns = key.namespace.clone().unwrap_or_default();
                if !self.has_namespace(&ns) {
                    return Err(StateError::NoNamespace(key.to_string(), ns));
                }
            }
        }
        if key.group.is_empty() && key.kind == "Service" {
            self.default_service(&mut obj)?;
        }
        self.objects.insert(key, obj.clone());
        Ok(obj)
    }

    /// Deletes an object; `Ok(false)` if it did not exist. Deleting a
    /// Namespace removes what it held, but not while pods run in it.
    pub fn delete(&mut self, key: &ObjectKey) -> Result<bool, StateError> {
        if key.group.is_empty() && key.kind == "Pod" {
            return Err(StateError::PodApplied(key.clone()));
        }
        if key.group.is_empty() && key.kind == "Namespace" {
            let pods: Vec<String> = self
                .pods
                .values()
                .filter(|p| p.namespace == key.name)
                .map(|p| p.name.clone())
                .collect();
            if !pods.is_empty() {
                return Err(StateError::NamespaceInUse(
                    key.name.clone(),
                    pods.join(", "),
                ));
            }
            self.objects
                .retain(|k, _| k.namespace.as_deref() != Some(key.name.as_str()));
        }
        Ok(self.objects.remove(key).is_some())
    }

    /// Replaces the set of objects istiod-rs has provisioned (see
    /// [`ClusterState::add_pod`]).
    pub fn set_provisioned(&mut self, keys: BTreeSet<ObjectKey>) {
        self.provisioned = keys;
    }

    /// Records a new pod (its namespace and service account must exist,
    /// applied or provisioned).
    pub fn add_pod(&mut self, pod: PodRecord) -> Result<(), StateError> {
        if !self.has_namespace(&pod.namespace) {
            return Err(StateError::NoNamespace(
                format!("pod {}/{}", pod.namespace, pod.name),
                pod.namespace.clone(),
            ));
        }
        let sa = ObjectKey::core("ServiceAccount", Some(&pod.namespace), &pod.service_account);
        if !self.objects.contains_key(&sa) && !self.provisioned.contains(&sa) {
            return Err(StateError::NoServiceAccount {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                sa: pod.service_account.clone(),
            });
        }
        let id = (pod.namespace.clone(), pod.name.clone());
        if self.pods.contains_key(&id) {
            return Err(StateError::PodExists(id.0, id.1));
        }
        self.pods.insert(id, pod);
        Ok(())
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodRecord> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn pod_mut(&mut self, namespace: &str, name: &str) -> Result<&mut PodRecord, StateError> {
        self.pods
            .get_mut(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| StateError::NoPod(namespace.to_string(), name.to_string()))
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<PodRecord, StateError> {
        self.pods
            .remove(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| StateError::NoPod(namespace.to_string(), name.to_string()))
    }

    /// Every object of the cluster, as YAML documents keyed by file name.
    pub fn render(&self) -> Result<BTreeMap<String, String>, StateError> {
        let mut out = BTreeMap::new();
        let mut put = |obj: Object| {
            out.insert(obj.key().file_name(), obj.to_yaml());
        };
        for node in &self.nodes {
            put(Object::from_typed(&node.to_node())?);
        }
        for obj in self.objects.values() {
            put(obj.clone());
        }
        for pod in self.pods.values() {
            put(Object::from_typed(&pod.to_pod())?);
        }
        for slice in self.endpoint_slices()? {
            put(Object::from_typed(&slice)?);
        }
        Ok(out)
    }

    /// The EndpointSlices the endpoint controller would keep for every
    /// Service with a selector: one slice per distinct resolved port list
    /// (a named targetPort may resolve differently per pod), endpoints for
    /// pods that have an address, with their readiness and termination.
    pub fn endpoint_slices(&self) -> Result<Vec<discovery::EndpointSlice>, StateError> {
        let mut slices = Vec::new();
        for (key, obj) in &self.objects {
            if !(key.group.is_empty() && key.kind == "Service") {
                continue;
            }
            let svc: core::Service = obj.to_typed()?;
            let spec = svc.spec.unwrap_or_default();
            let Some(selector) = spec.selector.filter(|s| !s.is_empty()) else {
                continue;
            };
            let ns = key.namespace.as_deref().unwrap_or_default();
            let ports = spec.ports.unwrap_or_default();
            let mut groups: BTreeMap<Vec<Option<i32>>, Vec<&PodRecord>> = BTreeMap::new();
            for pod in self.pods.values().filter(|p| {
                p.namespace == ns
                    && p.ip.is_some()
                    && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            }) {
                let resolved: Vec<Option<i32>> =
                    ports.iter().map(|sp| target_port(sp, pod)).collect();
                groups.entry(resolved).or_default().push(pod);
            }
            for (i, (resolved, pods)) in groups.into_iter().enumerate() {
                slices.push(endpoint_slice(&key.name, ns, i, &ports, &resolved, &pods));
            }
        }
        Ok(slices)
    }

    /// Fills `spec.clusterIP(s)` and checks the ports.
    fn default_service(&self, obj: &mut Object) -> Result<(), StateError> {
        let key = obj.key().clone();
        let svc: core::Service = obj.to_typed()?;
        let spec = svc.spec.unwrap_or_default();
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            if !(1..=65535).contains(&port.port) {
                return Err(StateError::Invalid {
                    key,
                    field: "spec.ports[].port",
                    problem: format!(
                        "port #{} is {}, which is not a TCP port number",
                        i + 1,
                        port.port
                    ),
                });
            }
        }
        let previous = self
            .objects
            .get(&key)
            .and_then(|o| o.value().pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let ip = match spec.cluster_ip.filter(|ip| !ip.is_empty()) {
            Some(ip) if ip == "None" => ip,
            Some(ip) => {
                let parsed: Ipv4Addr = ip.parse().map_err(|_| StateError::ClusterIp {
                    key: key.clone(),
                    ip: ip.clone(),
                    problem: "is not an IPv4 address".into(),
                })?;
                if !self.service_range.contains(&parsed) {
                    return Err(StateError::ClusterIp {
                        key,
                        ip,
                        problem: format!("is outside the service range {}", self.service_range),
                    });
                }
                if let Some(owner) = self.service_with_ip(&ip).filter(|k| *k != &key) {
                    return Err(StateError::ClusterIp {
                        key: key.clone(),
                        ip,
                        problem: format!("is already allocated to {owner}"),
                    });
                }
                ip
            }
            None => match previous {
                Some(ip) => ip,
                None => self.free_service_ip()?.to_string(),
            },
        };
        let spec = obj
            .value_mut()
            .as_object_mut()
            .expect("objects are mappings")
            .entry("spec")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(spec) = spec.as_object_mut() {
            spec.insert("clusterIP".into(), Value::String(ip.clone()));
            spec.insert("clusterIPs".into(), Value::Array(vec![Value::String(ip)]));
            spec.entry("type")
                .or_insert_with(|| Value::String("ClusterIP".into()));
        }
        Ok(())
    }

    fn service_with_ip(&self, ip: &str) -> Option<&ObjectKey> {
        self.objects
            .iter()
            .filter(|(k, _)| k.group.is_empty() && k.kind == "Service")
            .find(|(_, o)| o.value().pointer("/spec/clusterIP").and_then(Value::as_str) == Some(ip))
            .map(|(k, _)| k)
    }

    /// The lowest free address of the service range, skipping `.1` (the
    /// `kubernetes` service in a real cluster).
    fn free_service_ip(&self) -> Result<Ipv4Addr, StateError> {
        self.service_range
            .hosts()
            .skip(9)
            .find(|ip| self.service_with_ip(&ip.to_string()).is_none())
            .ok_or(StateError::ServiceRangeFull(self.service_range))
    }
}

/// A pod's port for a service port: a number as is, a name looked up in the
/// pod's container ports (`None`: the pod does not serve that port).
fn target_port(sp: &core::ServicePort, pod: &PodRecord) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| i32::from(*p)),
    }
}

fn endpoint_slice(
    service: &str,
    ns: &str,
    ordinal: usize,
    ports: &[core::ServicePort],
    resolved: &[Option<i32>],
    pods: &[&PodRecord],
) -> discovery::EndpointSlice {
    discovery::EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-{ordinal}")),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), service.to_string()),
                (
                    MANAGED_BY_LABEL.to_string(),
                    MANAGED_BY_CONTROLLER.to_string(),
                ),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            pods.iter()
                .map(|p| discovery::Endpoint {
                    addresses: vec![
                        p.ip.expect("only pods with an address are selected")
                            .to_string(),
                    ],
                    conditions: Some(discovery::EndpointConditions {
                        ready: Some(p.ready && !p.terminating),
                        serving: Some(p.ready),
                        terminating: Some(p.terminating),
                    }),
                    node_name: Some(p.node.clone()),
                    target_ref: Some(core::ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(p.name.clone()),
                        namespace: Some(p.namespace.clone()),
                        uid: Some(p.uid.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(
            ports
                .iter()
                .zip(resolved)
                .filter_map(|(sp, port)| {
                    Some(discovery::EndpointPort {
                        name: Some(sp.name.clone().unwrap_or_default()),
                        port: Some((*port)?),
                        protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: sp.app_protocol.clone(),
                    })
                })
                .collect(),
        ),
    }
}

/// A Namespace object.
pub fn namespace(name: &str, labels: &BTreeMap<String, String>) -> Object {
    Object::from_typed(&core::Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: (!labels.is_empty()).then(|| labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("a Namespace serializes")
}

/// A ServiceAccount object.
pub fn service_account(namespace: &str, name: &str) -> Object {
    Object::from_typed(&core::ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        ..Default::default()
    })
    .expect("a ServiceAccount serializes")
}

#[cfg(test)]
mod tests;
