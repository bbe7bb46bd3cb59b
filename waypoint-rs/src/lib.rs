//! waypoint-rs: the optional L7 proxy.
