//! Generated code, laid out as the protobuf packages so that cross-package
//! references (`super::super::google::rpc::Status`) resolve.
#![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]

pub mod google {
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

pub mod istio_rs {
    pub mod l7 {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/istio_rs.l7.v1.rs"));
        }
    }
}
