//! ztunnel's in-pod layer: handles on pods' network namespaces, the sockets
//! the proxy creates inside them, and the ZDS client through which the node
//! agent hands pods (with their netns) to the proxy.
//!
//! The proxy implements [`WorkloadProxyManager`]; for each pod it gets a
//! [`Netns`], builds an [`InPodSocketFactory`] on it and binds
//! [`InPodListeners`]; connections it opens on the pod's behalf come from
//! [`InPodSocketFactory::connect`], and the target of a redirected connection
//! from [`InPodSocketFactory::original_dst`].

pub mod netns;
pub mod seqpacket;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;
pub mod zds;

pub use netns::{Netns, NetnsError};
pub use socket::{InPodListeners, InPodSocketFactory, SocketError, original_dst};
pub use zds::{
    ManagerError, WorkloadProxyManager, WorkloadUid, ZdsClient, ZdsClientConfig, ZdsError,
};
