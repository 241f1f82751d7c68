//! A local cluster of `nats-server` nodes with JetStream, routed to each other on loopback.

use std::time::{Duration, Instant};

use crate::nats::{ClusterMembership, NATS_NAME, jetstream_api_answers, unique_name};
use crate::process::{READY_TIMEOUT, free_port, start_with_retry};
use crate::{LocalError, NatsOptions, NatsServer};

/// Pause between probes of the JetStream API.
const META_POLL: Duration = Duration::from_millis(50);

/// How to start a [`NatsCluster`].
#[derive(Debug, Clone)]
pub struct NatsClusterOptions {
    /// How many nodes (default 3: the smallest cluster that keeps a quorum, and an R3 stream
    /// writable, with one node down).
    pub nodes: usize,
    /// `jetstream { sync_interval: always }` on every node (default `true`), as in
    /// [`NatsOptions::sync_always`]. With R3 an acknowledged write is on a majority of the
    /// nodes either way; without it a coordinated crash of all nodes can lose it.
    pub sync_always: bool,
}

impl Default for NatsClusterOptions {
    fn default() -> Self {
        NatsClusterOptions {
            nodes: 3,
            sync_always: true,
        }
    }
}

/// Several `nats-server` processes on `127.0.0.1`, one cluster: each node has its own
/// temporary directory (config, log, JetStream store), client port and route port, a unique
/// server name, and routes to every other node.
///
/// Dropping it kills every node and removes their directories.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    name: String,
}

impl NatsCluster {
    /// Starts every node and returns once each answers its client port and the JetStream
    /// API answers through each of them, which needs a metadata leader: streams with as
    /// many replicas as nodes can then be created. Blocks for the startup, typically a few
    /// seconds (the leader election), bounded at about 10 s for the nodes and as much again
    /// for the election.
    pub fn start(opts: NatsClusterOptions) -> Result<NatsCluster, LocalError> {
        assert!(opts.nodes >= 1, "a cluster has at least one node");
        let name = unique_name();
        // A port taken between choosing and binding fails the start; it is retried with new
        // ports for every node (the retry hands over the first client port).
        let nodes = start_with_retry(NATS_NAME, None, |first_port| {
            let mut clients = ports(first_port, 2 * opts.nodes)?;
            let routes = clients.split_off(opts.nodes);
            let mut nodes = Vec::with_capacity(opts.nodes);
            for (i, (&client, &route)) in clients.iter().zip(&routes).enumerate() {
                let peers = routes
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &port)| port)
                    .collect();
                let membership = ClusterMembership {
                    name: name.clone(),
                    route_port: route,
                    peers,
                };
                let options = NatsOptions {
                    sync_always: opts.sync_always,
                    ..NatsOptions::default()
                };
                let mut node = NatsServer::prepare(options, client, Some(membership))?;
                node.write_config()?;
                node.spawn_and_wait()?;
                nodes.push(node);
            }
            Ok(nodes)
        })?;
        let mut cluster = NatsCluster { nodes, name };
        for i in 0..cluster.nodes.len() {
            cluster.wait_for_jetstream(i)?;
        }
        Ok(cluster)
    }

    /// Every node's client URL, `nats://127.0.0.1:PORT`, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs comma separated: the form `nats.url` takes.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The cluster's name, shared by its nodes.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nodes, in order: their ports, logs, directories and server names.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// The index of the node running with this `server_name` (as a stream's cluster info
    /// names its leader).
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|node| node.server_name() == server_name)
    }

    /// Kills node `i` with SIGKILL (a crash: no graceful shutdown, no leadership handed
    /// over) and reaps it. Its directory stays for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on the same ports and store (killing it first if it runs), and
    /// returns once the JetStream API answers through it, i.e. it has rejoined a cluster
    /// that has a metadata leader. Its streams may still be catching up.
    pub fn restart(&mut self, i: usize) -> Result<(), LocalError> {
        self.nodes[i].restart()?;
        self.wait_for_jetstream(i)
    }

    /// Polls `$JS.API.INFO` through node `i` until it answers, the node exits, or
    /// [`READY_TIMEOUT`] passes.
    fn wait_for_jetstream(&mut self, i: usize) -> Result<(), LocalError> {
        let started = Instant::now();
        let deadline = started + READY_TIMEOUT;
        loop {
            self.nodes[i].check_running()?;
            let now = Instant::now();
            if now >= deadline {
                let log_tail = self
                    .nodes
                    .iter()
                    .map(|node| format!("--- {} ---\n{}", node.server_name(), node.log_tail()))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(LocalError::NotReady {
                    name: format!("the JetStream API of nats cluster {}", self.name),
                    after: now - started,
                    log_tail,
                });
            }
            if jetstream_api_answers(self.nodes[i].port(), deadline - now) {
                return Ok(());
            }
            std::thread::sleep(META_POLL);
        }
    }
}

/// `first` and `count - 1` more free ports, distinct from each other.
fn ports(first: u16, count: usize) -> Result<Vec<u16>, LocalError> {
    let mut ports = vec![first];
    while ports.len() < count {
        let port = free_port()?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}
