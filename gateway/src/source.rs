//! Cluster sources: where a gateway learns its own cluster's services and
//! endpoints. Every backend publishes [`ClusterState`] snapshots on a watch
//! channel; the rest of the gateway does not know which backend it runs on.
//! The file backend reads one YAML file and reloads it when it changes.

pub mod file;

use std::sync::Arc;

use tokio::sync::watch;

use crate::catalog::ClusterState;

/// A source of the local cluster's state.
pub trait ClusterSource: Send + Sync {
    /// The current state, and every change after it.
    fn watch(&self) -> watch::Receiver<Arc<ClusterState>>;
}
