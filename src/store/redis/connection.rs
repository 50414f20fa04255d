//! How the store reaches Redis: a connection to one server or to a
//! cluster, behind one type, and the node a SCAN runs on.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::bounded;
use crate::store::StoreError;

/// How to open a connection.
pub(super) enum Dialer {
    Standalone(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

impl Dialer {
    /// How to reach `urls`: one URL for a standalone server, several
    /// (comma-separated) for the nodes of a cluster; read, not connected.
    pub(super) fn for_urls(urls: &str, timeout: Duration) -> Result<Dialer, StoreError> {
        let urls: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        match urls.as_slice() {
            [] => Err(StoreError::Unavailable("redis: no url".into())),
            [url] => {
                let client = redis::Client::open(*url)
                    .map_err(|_| StoreError::Unavailable("redis: invalid url".into()))?;
                // No response timeout of the crate's own: `bounded` already
                // times every command, reconnection included, and a second
                // tokio timer per command costs a timer-wheel entry (and at
                // times a wake-up of the thread) for nothing.
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(None)
                    .set_number_of_retries(2)
                    .set_max_delay(timeout);
                Ok(Dialer::Standalone(client, config))
            }
            nodes => {
                // A node gets a quarter of the timeout to accept a
                // connection: the crate opens a connection to every node
                // (and waits for them all) when a thread's connection is
                // opened, and again to those missing when it refreshes the
                // slot map after a MOVED, holding every other request of
                // the connection meanwhile. With the whole timeout there, a
                // hung node cost the sessions of the nodes that answer
                // their 503 too, and a proxy started then did not start.
                let client = ClusterClient::builder(nodes.iter().copied())
                    .connection_timeout(timeout / 4)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()
                    .map_err(|_| StoreError::Unavailable("redis: invalid cluster url".into()))?;
                Ok(Dialer::Cluster(client))
            }
        }
    }

    pub(super) async fn open(&self, timeout: Duration) -> Result<Connection, StoreError> {
        match self {
            Dialer::Standalone(client, config) => {
                let manager = ConnectionManager::new_with_config(client.clone(), config.clone());
                Ok(Connection::Standalone(
                    bounded(timeout, "connect", manager).await?,
                ))
            }
            Dialer::Cluster(client) => {
                let connection = client.get_async_connection();
                Ok(Connection::Cluster(
                    bounded(timeout, "connect", connection).await?,
                ))
            }
        }
    }
}

#[derive(Clone)]
pub(super) enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Where a SCAN runs: the one server, or one master of the cluster.
pub(super) enum Node {
    Standalone,
    ClusterMaster { host: String, port: u16 },
}

impl Node {
    pub(super) fn routing(&self) -> Option<RoutingInfo> {
        match self {
            Node::Standalone => None,
            Node::ClusterMaster { host, port } => {
                Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                }))
            }
        }
    }
}
