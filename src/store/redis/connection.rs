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
