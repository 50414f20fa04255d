//! A private Redis Cluster for a test: three cluster-enabled
//! `redis-server`s (masters; with a replica each if asked) on free loopback ports, joined
//! into one cluster, killed (and their directory removed) on drop whatever
//! the test's outcome. Shared by `store_shared` (the store against it) and
//! `redis_cluster_faults` (the proxy under faults of its nodes), which
//! kill, restart, hang and reshard its nodes.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::redis_server_installed;

/// How long a node may be unreachable before the others mark it failed;
/// short, so that a test sees the cluster react to a dead node (the
/// default is 15 s).
pub const NODE_TIMEOUT_MS: u64 = 1000;

pub struct Cluster {
    /// Each node's process, masters first; `None` while a test has it
    /// killed.
    children: Vec<Option<Child>>,
    /// The masters' ports.
    pub ports: Vec<u16>,
    /// The replicas' ports (after the masters' in `children`).
    pub replicas: Vec<u16>,
    dir: PathBuf,
    /// Nodes a test stopped (SIGSTOP), continued on drop.
    stopped: Vec<u32>,
    /// The host name the nodes announce, as the endpoint clients use.
    host_name: Option<&'static str>,
    /// With TLS: the CA's file, and the nodes' certificate and key.
    tls: Option<TlsFiles>,
}

/// PEM files for a cluster over TLS: the CA that signed the certificate,
/// and the certificate (for `localhost` and `127.0.0.1`) and key the nodes
/// use.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in self.stopped.drain(..) {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// Three masters, no replicas. `None` (with a loud skip) when
    /// `redis-server` is not installed.
    pub fn start() -> Option<Cluster> {
        Cluster::start_with(0, None, None)
    }

    /// Three masters, each with a replica that takes over when it fails.
    pub fn start_with_replicas() -> Option<Cluster> {
        Cluster::start_with(1, None, None)
    }

    /// Three masters speaking only TLS (to clients and to each other), with
    /// a certificate of a test CA, that tell clients to connect to them by
    /// a host name (`localhost`; `cluster-preferred-endpoint-type
    /// hostname`, as TLS deployments do so that certificates can name
    /// hosts). `CLUSTER NODES` still names each by its IP.
    pub fn start_over_tls_by_host_name(files: TlsFiles) -> Option<Cluster> {
        Cluster::start_with(0, Some("localhost"), Some(files))
    }

    fn start_with(
        replicas_per_master: usize,
        host_name: Option<&'static str>,
        tls: Option<TlsFiles>,
    ) -> Option<Cluster> {
        if !redis_server_installed("Redis Cluster") {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "session-proxy-cluster_{:016x}",
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("cluster directory");
        let ports = free_cluster_ports(3 * (1 + replicas_per_master));
        let mut cluster = Cluster {
            children: Vec::new(),
            // `--cluster create` makes masters of the first three (one
            // host): the others replicate them.
            replicas: ports[3..].to_vec(),
            ports: ports[..3].to_vec(),
            dir,
            stopped: Vec::new(),
            host_name,
            tls,
        };
        for &port in &ports {
            let child = cluster.spawn(port);
            cluster.children.push(Some(child));
        }
        for &port in &ports {
            wait_until(|| cluster.cli(port, &["ping"]).contains("PONG"));
        }
        let nodes: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(cluster.tls_args())
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &ports {
            wait_until(|| cluster.node_sees_all_ok(port));
        }
        for &port in &cluster.replicas {
            wait_until(|| {
                cluster
                    .cli(port, &["info", "replication"])
                    .contains("master_link_status:up")
            });
        }
        let masters: BTreeSet<u16> = cluster
            .ports
            .iter()
            .map(|&port| cluster.owner_of_slot(cluster.first_slot_of(port)))
            .collect();
        assert_eq!(
            masters,
            cluster.ports.iter().copied().collect(),
            "the first three are the masters"
        );
        Some(cluster)
    }

    /// Waits until every replica of the master of `port` has acknowledged
    /// all it was sent: replication is asynchronous, and a failover loses
    /// what its replica had not received. (`WAIT` from another client does
    /// not do it: it waits for that client's own writes.)
    pub fn wait_replicated(&self, port: u16) {
        wait_until(|| {
            let info = self.cli(port, &["info", "replication"]);
            let field = |line: &str, name: &str| -> Option<u64> {
                line.split(',')
                    .find_map(|pair| pair.strip_prefix(name)?.trim().parse().ok())
            };
            let sent = info
                .lines()
                .find_map(|line| field(line, "master_repl_offset:"));
            let acked: Vec<u64> = info
                .lines()
                .filter(|line| line.starts_with("slave"))
                .filter_map(|line| field(line.split_once(':')?.1, "offset="))
                .collect();
            sent.is_some_and(|sent| !acked.is_empty() && acked.iter().all(|&acked| acked >= sent))
        });
    }

    /// The first slot the master of `port` serves, from its CLUSTER NODES line.
    pub fn first_slot_of(&self, port: u16) -> u16 {
        let address = format!("127.0.0.1:{port}@");
        self.cli(port, &["cluster", "nodes"])
            .lines()
            .find(|line| line.contains(&address))
            .and_then(|line| line.split_whitespace().nth(8))
            .and_then(|range| range.split('-').next()?.parse().ok())
            .unwrap_or_else(|| panic!("node {port} serves no slot"))
    }

    /// Starts the node of `port`, with its own `nodes.conf` (its identity
    /// and slots, kept across a restart) and its own RDB file (written
    /// only by an explicit `SAVE`, read back on a restart). With
    /// `cluster-require-full-coverage no`, as a deployment that wants the
    /// sessions on the other masters served while one is down must have.
    fn spawn(&self, port: u16) -> Child {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &port.to_string()]),
            Some(files) => command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"]),
        };
        if let Some(name) = self.host_name {
            command
                .args(["--cluster-announce-hostname", name])
                .args(["--cluster-preferred-endpoint-type", "hostname"]);
        }
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{port}.conf")))
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--dbfilename", &format!("dump-{port}.rdb")])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // A replica's first sync at once, not after the default 5 s.
            .args(["--repl-diskless-sync-delay", "0"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server")
    }

    /// Whether the node of `port` answers and sees every node of the
    /// cluster connected and the cluster's state ok.
    fn node_sees_all_ok(&self, port: u16) -> bool {
        let info = self.cli(port, &["cluster", "info"]);
        let nodes = self.cli(port, &["cluster", "nodes"]);
        info.contains("cluster_state:ok")
            && nodes
                .lines()
                .filter(|line| line.contains("connected"))
                .count()
                == self.ports.len() + self.replicas.len()
            && !nodes.contains("fail")
    }

    /// The URLs of the nodes, comma-separated, as `[store] url` takes them.
    pub fn urls(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let host = self.host_name.unwrap_or("127.0.0.1");
        self.ports
            .iter()
            .map(|port| format!("{scheme}://{host}:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// With TLS, the CA that signed the nodes' certificate.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|files| files.ca.clone())
    }

    /// `redis-cli`'s options to reach the nodes.
    fn tls_args(&self) -> Vec<String> {
        match &self.tls {
            None => Vec::new(),
            Some(files) => vec![
                "--tls".into(),
                "--cacert".into(),
                files.ca.display().to_string(),
            ],
        }
    }

    /// `redis-cli -p PORT ARGS…` on a node of this cluster.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let tls = self.tls_args();
        let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        redis_cli(port, &all)
    }

    fn index(&self, port: u16) -> usize {
        self.ports
            .iter()
            .chain(&self.replicas)
            .position(|&p| p == port)
            .expect("a node of the cluster")
    }

    /// Saves the node's data (to be read back by [`Cluster::restart`]),
    /// then kills it (SIGKILL: a crash).
    pub fn kill(&mut self, port: u16) {
        assert!(self.cli(port, &["save"]).contains("OK"), "SAVE on {port}");
        let index = self.index(port);
        if let Some(mut child) = self.children[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again on its port with its `nodes.conf` and
    /// saved data, and waits until every node sees the cluster whole.
    pub fn restart(&mut self, port: u16) {
        let index = self.index(port);
        assert!(self.children[index].is_none(), "node {port} is running");
        let child = self.spawn(port);
        self.children[index] = Some(child);
        wait_until(|| self.cli(port, &["ping"]).contains("PONG"));
        for &port in &self.ports {
            wait_until(|| self.node_sees_all_ok(port));
        }
    }

    fn pid(&self, port: u16) -> u32 {
        self.children[self.index(port)]
            .as_ref()
            .expect("a running node")
            .id()
    }

    /// Hangs the node (SIGSTOP): it accepts connections (the kernel does)
    /// and answers nothing, until [`Cluster::resume`] (or the drop).
    pub fn hang(&mut self, port: u16) {
        let pid = self.pid(port);
        signal(pid, "STOP");
        self.stopped.push(pid);
    }

    /// Continues a hung node, and waits until every node sees the cluster
    /// whole again.
    pub fn resume(&mut self, port: u16) {
        let pid = self.pid(port);
        signal(pid, "CONT");
        self.stopped.retain(|&stopped| stopped != pid);
        for &port in &self.ports {
            wait_until(|| self.node_sees_all_ok(port));
        }
    }

    /// The hash slot of `key` (asked of a node, not computed here).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.live_port();
        self.cli(port, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key} on {port}"))
    }

    /// The port of the master that serves `key` now.
    pub fn owner_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        self.owner_of_slot(slot)
    }

    /// The port of the master that serves `slot`, from CLUSTER NODES.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        let nodes = self.cli(self.live_port(), &["cluster", "nodes"]);
        nodes
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // Slot ranges after the eighth field; `[…]` while one moves.
                let serves = fields.iter().skip(8).any(|range| {
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    matches!(
                        (first.parse::<u16>(), last.parse::<u16>()),
                        (Ok(first), Ok(last)) if (first..=last).contains(&slot)
                    )
                });
                let address = fields.get(1)?.split('@').next()?;
                serves.then(|| address.rsplit_once(':')?.1.parse().ok())?
            })
            .unwrap_or_else(|| panic!("slot {slot} has no master: {nodes}"))
    }

    /// A node that is running and not hung, to ask about the cluster.
    fn live_port(&self) -> u16 {
        self.ports
            .iter()
            .zip(&self.children)
            .find(|(_, child)| {
                child
                    .as_ref()
                    .is_some_and(|child| !self.stopped.contains(&child.id()))
            })
            .map(|(&port, _)| port)
            .expect("a live node")
    }

    /// Whether a node that runs has the node of `port` flagged failed
    /// (`fail`, agreed by the masters; not just `fail?`).
    pub fn is_marked_failed(&self, port: u16) -> bool {
        let address = format!("127.0.0.1:{port}@");
        self.cli(self.live_port(), &["cluster", "nodes"])
            .lines()
            .filter(|line| line.contains(&address))
            .any(|line| {
                line.split_whitespace()
                    .nth(2)
                    .is_some_and(|flags| flags.split(',').any(|flag| flag == "fail"))
            })
    }

    /// The node id of the node of `port`.
    pub fn node_id(&self, port: u16) -> String {
        self.cli(port, &["cluster", "myid"]).trim().to_owned()
    }

    /// Marks `slot` as moving from the node of `from` to the node of `to`
    /// (`IMPORTING` on `to`, `MIGRATING` on `from`): from now on `from`
    /// answers `ASK` for its keys of the slot that it no longer holds.
    pub fn begin_slot_move(&self, slot: u16, from: u16, to: u16) {
        let slot = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let ok = |port: u16, args: &[&str]| {
            let answer = self.cli(port, args);
            assert!(answer.contains("OK"), "{args:?} on {port}: {answer}");
        };
        ok(to, &["cluster", "setslot", &slot, "importing", &from_id]);
        ok(from, &["cluster", "setslot", &slot, "migrating", &to_id]);
    }

    /// Moves `key` (of a slot being moved) from `from` to `to` (MIGRATE).
    pub fn migrate_key(&self, key: &str, from: u16, to: u16) {
        let answer = self.cli(
            from,
            &["migrate", "127.0.0.1", &to.to_string(), key, "0", "5000"],
        );
        assert!(
            answer.contains("OK") || answer.contains("NOKEY"),
            "MIGRATE {key}: {answer}"
        );
    }

    /// Ends the move of `slot` from the node of `from` to the node of `to`:
    /// every node is told `to` serves the slot now. `from` is told first
    /// and `to` only `lag` later, the order Redis's documentation warns
    /// against: in between, each sends a client to the other with `MOVED`
    /// (`to`, still importing, takes the slot's commands only after
    /// `ASKING`), the window an operator moving slots by hand can open.
    pub fn end_slot_move(&self, slot: u16, from: u16, to: u16, lag: Duration) {
        let slot = slot.to_string();
        let to_id = self.node_id(to);
        let tell = |port: u16| {
            let answer = self.cli(port, &["cluster", "setslot", &slot, "node", &to_id]);
            assert!(answer.contains("OK"), "SETSLOT NODE on {port}: {answer}");
        };
        tell(from);
        std::thread::sleep(lag);
        tell(to);
        for &port in self
            .ports
            .iter()
            .filter(|&&port| port != from && port != to)
        {
            tell(port);
        }
    }

    /// The keys the node of `port` holds in `slot`.
    pub fn keys_in_slot(&self, port: u16, slot: u16) -> Vec<String> {
        self.cli(
            port,
            &["cluster", "getkeysinslot", &slot.to_string(), "1000"],
        )
        .lines()
        .map(str::to_owned)
        .filter(|key| !key.is_empty())
        .collect()
    }
}

/// `redis-cli -p PORT ARGS…`: what it printed (nothing when it failed).
/// Gives up after 5 s, so a hung node does not hang the test.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("timeout")
        .args(["5", "redis-cli", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

fn wait_until(ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "cluster not ready in 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ports free now, each with its cluster bus port (+10000) free too; below
/// the kernel's ephemeral range, and below the ports `free_port` hands
/// out, so that no outgoing connection takes the port of a node a test has
/// killed before it starts again.
fn free_cluster_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // free_port's span (8192), the bus offset, and 2500 ports to draw from.
    let low = ephemeral_low.saturating_sub(8192 + 10_000 + 2500).max(1024);
    let mut ports = BTreeSet::new();
    while ports.len() < n {
        let port = low + (rand::random::<u16>() % 2500);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            ports.insert(port);
        }
    }
    ports.into_iter().collect()
}
