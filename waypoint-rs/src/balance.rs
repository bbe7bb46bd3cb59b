//! Endpoint choice for one destination: the DestinationRule's load balancer
//! (`pick`, `maglev`) over the endpoints outlier detection (`outlier`) has
//! not ejected. Pure: randomness and the clock are passed in.

pub mod maglev;
pub mod outlier;
pub mod pick;

pub use maglev::Maglev;
pub use outlier::{Outcome, OutlierConfig, OutlierDetector};
pub use pick::{Balancer, Candidate, ConsistentHash, HashKey, LoadBalancer, Simple};
