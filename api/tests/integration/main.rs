//! api's integration tests, one test binary (each binary links the
//! whole dependency tree: one per file took gigabytes of disk and minutes of
//! linking). A test that changes process-wide state (descriptor limits, the
//! log subscriber) keeps a binary of its own in `tests/`.

mod crds_fresh;
mod wire_golden;
