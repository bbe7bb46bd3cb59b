//! istiod-rs: the control plane. Cluster state in, workload API out over delta
//! xDS; the embedded CA; waypoint provisioning.
