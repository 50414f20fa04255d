//! Which masters serve a Redis Cluster's slots, read from `CLUSTER
//! SLOTS` (the endpoints the crate connects to, IPs or host names) with
//! the failing flags of `CLUSTER NODES`: for `/healthz`, `sessions` and
//! the sweep, which must reach every master.

use std::collections::HashSet;

use redis::Value;

/// The slots of a Redis Cluster.
pub(super) const CLUSTER_SLOTS: u32 = 16384;

/// A master of a cluster, by the endpoint the crate connects to.
pub(super) struct ClusterMaster {
    pub(super) host: String,
    pub(super) port: u16,
    /// How many slots it serves.
    pub(super) slots: u32,
    /// Flagged failing, or not yet or no longer reachable.
    pub(super) failing: bool,
}

/// The ids of the nodes a `CLUSTER NODES` answer (`id host:port@cport
/// flags …` a line) flags failing, or not yet or no longer reachable.
pub(super) fn failing_ids(nodes: &str) -> HashSet<&str> {
    nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next()?;
            let flags = fields.nth(1)?;
            flags
                .split(',')
                .any(|flag| matches!(flag, "fail" | "fail?" | "handshake" | "noaddr"))
                .then_some(id)
        })
        .collect()
}

/// The masters in a `CLUSTER SLOTS` answer (`[first, last, [endpoint,
/// port, id, …], replicas…]` a range), with the slots each serves. A master
/// of unknown endpoint (`""`, `"?"`) is left out, its slots unserved.
pub(super) fn masters_of(slots: &Value, failing: &HashSet<&str>) -> Vec<ClusterMaster> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut masters: Vec<ClusterMaster> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let [Value::Int(first), Value::Int(last), Value::Array(master), ..] = range.as_slice()
        else {
            continue;
        };
        let (Some(host), Some(Value::Int(port)), id) = (
            master.first().and_then(text),
            master.get(1),
            master.get(2).and_then(text),
        ) else {
            continue;
        };
        let count = last
            .checked_sub(*first)
            .and_then(|span| span.checked_add(1));
        let (Ok(port), Some(Ok(count))) = (u16::try_from(*port), count.map(u32::try_from)) else {
            continue;
        };
        if host.is_empty() || host == "?" {
            continue;
        }
        match masters
            .iter_mut()
            .find(|m| m.host == host && m.port == port)
        {
            Some(known) => known.slots += count,
            None => masters.push(ClusterMaster {
                failing: id.is_some_and(|id| failing.contains(id.as_str())),
                host,
                port,
                slots: count,
            }),
        }
    }
    masters
}

/// A string of a server's answer, bulk or simple.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `CLUSTER SLOTS` range: `first..=last` served by `endpoint:port` (id `id`).
    fn range(first: i64, last: i64, endpoint: &str, port: i64, id: &str) -> Value {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let master = Value::Array(vec![bulk(endpoint), Value::Int(port), bulk(id)]);
        let replica = Value::Array(vec![bulk("10.0.0.9"), Value::Int(7009), bulk("r9")]);
        Value::Array(vec![Value::Int(first), Value::Int(last), master, replica])
    }

    #[test]
    fn cluster_masters_are_named_by_their_cluster_slots_endpoint_and_flagged_from_cluster_nodes() {
        let slots = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000, "a1"),
            range(5461, 10922, "redis-1.example", 7001, "b2"),
            range(10923, 16382, "127.0.0.1", 7003, "d4"),
            range(16383, 16383, "127.0.0.1", 7003, "d4"),
        ]);
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001,redis-1.example master,fail? - 0 0 2 connected 5461-10922
c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected
d4 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383
";
        let masters: Vec<(String, u16, u32, bool)> = masters_of(&slots, &failing_ids(nodes))
            .into_iter()
            .map(|m| (m.host, m.port, m.slots, m.failing))
            .collect();
        assert_eq!(
            masters,
            vec![
                ("127.0.0.1".into(), 7000, 5461, false),
                ("redis-1.example".into(), 7001, 5462, true),
                ("127.0.0.1".into(), 7003, 5461, false),
            ]
        );
        // An unknown endpoint, and answers of another shape, give no master;
        // nothing on the way panics on a range that runs backwards.
        let odd = Value::Array(vec![
            range(0, 10, "?", 7000, "a1"),
            range(20, 10, "127.0.0.1", 7000, "a1"),
            Value::Int(3),
            Value::Array(vec![Value::Int(0)]),
        ]);
        assert!(masters_of(&odd, &HashSet::new()).is_empty());
        assert!(masters_of(&Value::Nil, &HashSet::new()).is_empty());
    }
}
