//! See [`super`]. (Being written.)

use super::KubeScenario;

/// This module's scenarios, in the order they run.
pub fn scenarios() -> Vec<KubeScenario> {
    Vec::new()
}
