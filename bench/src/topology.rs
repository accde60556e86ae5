//! Where a comparison's clients, proxies and backends run: on loopback in this process's
//! network namespace (the default), or each in a network namespace of its own, joined by
//! veth pairs (client <-> proxy <-> backend), which is closer to traffic through a NIC.
//!
//! The veth topology, for run PID (namespaces `sluice-bench-PID-client`, `-proxy`,
//! `-backend`), on the private network [`VETH_NETWORK`]/16:
//!
//! ```text
//!  client ns                 proxy ns                              backend ns
//!  veth-c 10.250.1.1/24 <-> veth-pc 10.250.1.2/24
//!                            veth-pb 10.250.2.1/24 <-> veth-b 10.250.2.2/24
//!  route 10.250.2.0/24 via 10.250.1.2      ip_forward=1   route 10.250.1.0/24 via 10.250.2.1
//! ```
//!
//! Proxies listen on 10.250.1.2 and forward to backends on 10.250.2.2; "direct" clients
//! reach the backends through the proxy namespace's kernel forwarding, the same two hops.
//!
//! LIFECYCLE: refuse unless root; delete namespaces an earlier run left behind when it was
//! killed (the name carries its pid, and that pid is gone); create the namespaces, pairs,
//! addresses and routes (a failure midway deletes what was made); record MTU and offloads.
//! Dropping the [`Topology`] deletes the namespaces, and the veth pairs with them, after
//! success, an error, Ctrl-C or a panic. The kernel frees a deleted namespace once no
//! socket or process of this run holds it any more.
//!
//! Work runs in a namespace on a scoped thread that joins it with setns(2) first: sockets it
//! opens belong to that namespace for good, and threads it starts inherit it, so the
//! in-process backends and load keep working unchanged. Proxies start through
//! `ip netns exec`, which enters the namespace and executes the program under the same pid.
//! `ip` commands run in a process group of their own, so a Ctrl-C on the terminal cannot
//! cut a set-up or tear-down step short.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};
use serde::Serialize;

use crate::error::{file_context, io_context, BenchError, Result};
use crate::table::Table;

/// MTU of the veth pairs unless `--veth-mtu` says otherwise: that of an Ethernet NIC.
pub const DEFAULT_VETH_MTU: u32 = 1500;
/// The private network of the veth topology; it exists only inside this run's namespaces.
pub const VETH_NETWORK: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);
/// Prefix length of [`VETH_NETWORK`].
pub const VETH_PREFIX: u8 = 16;
/// Namespace names start with this, then the pid of the run.
const NAME_PREFIX: &str = "sluice-bench-";
/// Offloads shown in the report (the full `ethtool -k` output goes to topology.txt).
pub const SHOWN_OFFLOADS: [(&str, &str); 6] = [
    ("tx-checksumming", "tx csum"),
    ("scatter-gather", "sg"),
    ("tcp-segmentation-offload", "tso"),
    ("generic-segmentation-offload", "gso"),
    ("generic-receive-offload", "gro"),
    ("large-receive-offload", "lro"),
];

/// Where a comparison runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopologyKind {
    /// Everything on 127.0.0.1 in this network namespace.
    Loopback,
    /// Clients, proxies and backends each in a network namespace of their own, joined by
    /// veth pairs (needs root).
    Veth,
}

/// One of the three parties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Proxy,
    Backend,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Proxy => "proxy",
            Side::Backend => "backend",
        }
    }
}

/// One end of a veth pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub side: Side,
    pub device: &'static str,
    pub address: Ipv4Addr,
    pub peer: &'static str,
}

/// Both veth pairs, client side first: (client, proxy-facing-client), (proxy-facing-backend,
/// backend).
pub const LINKS: [Link; 4] = [
    Link {
        side: Side::Client,
        device: "veth-c",
        address: Ipv4Addr::new(10, 250, 1, 1),
        peer: "veth-pc",
    },
    Link {
        side: Side::Proxy,
        device: "veth-pc",
        address: Ipv4Addr::new(10, 250, 1, 2),
        peer: "veth-c",
    },
    Link {
        side: Side::Proxy,
        device: "veth-pb",
        address: Ipv4Addr::new(10, 250, 2, 1),
        peer: "veth-b",
    },
    Link {
        side: Side::Backend,
        device: "veth-b",
        address: Ipv4Addr::new(10, 250, 2, 2),
        peer: "veth-pb",
    },
];
/// Prefix length of each pair's subnet.
const LINK_PREFIX: u8 = 24;

/// One set-up step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run `ip` with these arguments.
    Ip(Vec<String>),
    /// Turn on IPv4 forwarding in a namespace.
    Forwarding(Side),
}

/// The names and commands of one run's veth topology; pure, so they can be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPlan {
    /// Pid of the run, part of every namespace name.
    pub run: u32,
    pub mtu: u32,
}

impl VethPlan {
    /// The namespace of a side: `sluice-bench-PID-client`.
    pub fn namespace(&self, side: Side) -> String {
        format!("{NAME_PREFIX}{}-{}", self.run, side.name())
    }

    /// The namespaces, in the order they are made.
    pub fn namespaces(&self) -> [String; 3] {
        [Side::Client, Side::Proxy, Side::Backend].map(|side| self.namespace(side))
    }

    /// Every step that builds the topology, in order.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps: Vec<Step> =
            self.namespaces().iter().map(|ns| ip(&["netns", "add", ns])).collect();
        let mtu = self.mtu.to_string();
        for pair in [(LINKS[0], LINKS[1]), (LINKS[2], LINKS[3])] {
            let (a, b) = (self.namespace(pair.0.side), self.namespace(pair.1.side));
            steps.push(ip(&[
                "link",
                "add",
                "name",
                pair.0.device,
                "netns",
                &a,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                pair.1.device,
                "netns",
                &b,
                "mtu",
                &mtu,
            ]));
        }
        for link in LINKS {
            let ns = self.namespace(link.side);
            let address = format!("{}/{LINK_PREFIX}", link.address);
            steps.push(ip(&["-n", &ns, "addr", "add", &address, "dev", link.device]));
            steps.push(ip(&["-n", &ns, "link", "set", "dev", link.device, "up"]));
        }
        for ns in self.namespaces() {
            steps.push(ip(&["-n", &ns, "link", "set", "dev", "lo", "up"]));
        }
        let (client, backend) = (self.namespace(Side::Client), self.namespace(Side::Backend));
        let backend_net = format!("{}/{LINK_PREFIX}", subnet(LINKS[3].address));
        let client_net = format!("{}/{LINK_PREFIX}", subnet(LINKS[0].address));
        let (via_proxy, via_proxy_back) =
            (LINKS[1].address.to_string(), LINKS[2].address.to_string());
        steps.push(ip(&["-n", &client, "route", "add", &backend_net, "via", &via_proxy]));
        steps.push(ip(&["-n", &backend, "route", "add", &client_net, "via", &via_proxy_back]));
        steps.push(Step::Forwarding(Side::Proxy));
        steps
    }

    /// `command` wrapped in `ip netns exec` for `side`'s namespace.
    pub fn command(&self, side: Side, command: Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped
            .arg("netns")
            .arg("exec")
            .arg(self.namespace(side))
            .arg(command.get_program())
            .args(command.get_args());
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// The `ip` arguments that delete the topology (the veth pairs go with the namespaces).
    pub fn teardown(&self) -> Vec<Vec<String>> {
        self.namespaces().iter().map(|ns| args(&["netns", "delete", ns])).collect()
    }
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ip(items: &[&str]) -> Step {
    Step::Ip(args(items))
}

/// The address of `side` in the veth topology (the proxy's is the one clients reach).
pub fn veth_address(side: Side) -> Ipv4Addr {
    let index = match side {
        Side::Client => 0,
        Side::Proxy => 1,
        Side::Backend => 3,
    };
    LINKS[index].address
}

/// Runs `work` on a thread that joins the named network namespace first.
fn run_in_namespace<T: Send>(name: &str, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = Path::new("/run/netns").join(name);
    let namespace = File::open(&path).map_err(file_context(&path))?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn_scoped(scope, || {
                setns(&namespace, CloneFlags::CLONE_NEWNET).map_err(|e| BenchError::Io {
                    context: format!("entering network namespace {}", path.display()),
                    source: e.into(),
                })?;
                drop(namespace);
                work()
            })
            .map_err(io_context("spawning a namespace thread"))?;
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The /24 network an address lies in.
fn subnet(address: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = address.octets();
    Ipv4Addr::new(a, b, c, 0)
}

/// True for an address of the veth topology's private network.
pub fn in_veth_network(address: IpAddr) -> bool {
    let IpAddr::V4(v4) = address else { return false };
    let mask = u32::MAX << (32 - u32::from(VETH_PREFIX));
    u32::from(v4) & mask == u32::from(VETH_NETWORK)
}

/// Namespaces named by `ip netns list` that an earlier run left behind: ours by name, and
/// the run's pid is not `alive`.
pub fn stale_namespaces(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            let Some(rest) = name.strip_prefix(NAME_PREFIX) else { return false };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            pid.is_some_and(|pid| !alive(pid))
        })
        .map(String::from)
        .collect()
}

/// Feature name -> state (`on`, `off`, `off [fixed]`...) from `ethtool -k` output.
pub fn parse_offloads(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (name, state) = line.trim().split_once(": ")?;
            (!name.contains(' ')).then(|| (name.to_string(), state.trim().to_string()))
        })
        .collect()
}

/// The MTU from the output of `ip -o link show`.
pub fn parse_mtu(text: &str) -> Option<u32> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next()?.parse().ok()
}

/// What a reader needs to know about one veth end.
#[derive(Debug, Clone, Serialize)]
pub struct LinkInfo {
    pub side: Side,
    pub namespace: String,
    pub device: &'static str,
    pub address: String,
    pub peer: &'static str,
    pub mtu: Option<u32>,
    /// `ethtool -k` as feature -> state; empty without ethtool.
    pub offloads: BTreeMap<String, String>,
}

/// The topology as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyInfo {
    pub kind: TopologyKind,
    /// Where proxies listen, where backends listen, where clients connect from.
    pub proxy_address: IpAddr,
    pub backend_address: IpAddr,
    pub client_address: IpAddr,
    /// MTU of lo on loopback; of the veth pairs otherwise.
    pub mtu: Option<u32>,
    pub links: Vec<LinkInfo>,
    /// Why offloads are missing, if they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offloads_note: Option<String>,
    /// `ip addr`, `ip route` and `ethtool -k` of every namespace, as text.
    #[serde(skip)]
    pub raw: String,
}

impl TopologyInfo {
    /// The topology as a report section: a sentence on loopback; the pairs, addresses, MTU
    /// and main offloads in a table on veth.
    pub fn markdown(&self) -> String {
        let mtu = self.mtu.map_or("unknown".into(), |m| m.to_string());
        if self.kind == TopologyKind::Loopback {
            return format!(
                "Topology: loopback. Clients, proxies and backends share this machine's network namespace, on {} (lo, MTU {mtu}).\n\n",
                self.proxy_address
            );
        }
        let mut text = format!(
            "## Topology: veth\n\nClients ({}), proxies ({}) and backends ({}) each run in a network namespace of their own, joined by veth pairs with MTU {mtu}: client <-> proxy <-> backend. Proxies listen on {} and forward to the backends; *direct* clients reach the backends through the proxy namespace's IPv4 forwarding (the same two hops, no proxy process). The full `ip addr`, `ip route` and `ethtool -k` of every namespace: [topology.txt](topology.txt).\n\n",
            self.client_address, self.proxy_address, self.backend_address, self.proxy_address
        );
        let mut table = Table::new(
            ["namespace", "device", "address", "peer", "MTU"]
                .into_iter()
                .chain(SHOWN_OFFLOADS.iter().map(|(_, label)| *label)),
        );
        for link in &self.links {
            let offloads = SHOWN_OFFLOADS
                .iter()
                .map(|(name, _)| link.offloads.get(*name).cloned().unwrap_or_else(|| "?".into()));
            table.row(
                [
                    link.namespace.clone(),
                    link.device.to_string(),
                    link.address.clone(),
                    link.peer.to_string(),
                    link.mtu.map_or("?".into(), |m| m.to_string()),
                ]
                .into_iter()
                .chain(offloads),
            );
        }
        text += &table.render();
        if let Some(note) = &self.offloads_note {
            text += &format!("\n{note}\n");
        }
        text + "\n"
    }
}

/// Where a comparison runs; dropping it removes whatever it set up.
#[derive(Debug)]
pub enum Topology {
    Loopback,
    Veth(VethNet),
}

/// A veth topology that exists; dropping it deletes the namespaces.
#[derive(Debug)]
pub struct VethNet {
    plan: VethPlan,
}

impl Topology {
    /// Sets up the topology of `kind` (`mtu` applies to veth pairs).
    pub fn set_up(kind: TopologyKind, mtu: u32) -> Result<Topology> {
        match kind {
            TopologyKind::Loopback => Ok(Topology::Loopback),
            TopologyKind::Veth => {
                VethNet::create(VethPlan { run: std::process::id(), mtu }).map(Topology::Veth)
            }
        }
    }

    /// The address `side` uses.
    pub fn address(&self, side: Side) -> IpAddr {
        match self {
            Topology::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Topology::Veth(_) => IpAddr::V4(veth_address(side)),
        }
    }

    /// Runs `work` in `side`'s namespace: inline on loopback, else on a thread that joins
    /// the namespace first. Sockets `work` opens, and threads it starts, live there.
    pub fn run_in<T: Send>(
        &self,
        side: Side,
        work: impl FnOnce() -> Result<T> + Send,
    ) -> Result<T> {
        match self {
            Topology::Loopback => work(),
            Topology::Veth(net) => run_in_namespace(&net.plan.namespace(side), work),
        }
    }

    /// `command` as it must be spawned to run in `side`'s namespace.
    pub fn command(&self, side: Side, command: Command) -> Command {
        match self {
            Topology::Loopback => command,
            Topology::Veth(net) => net.plan.command(side, command),
        }
    }

    /// Addresses, MTU and offloads, for the report.
    pub fn describe(&self) -> TopologyInfo {
        match self {
            Topology::Loopback => TopologyInfo {
                kind: TopologyKind::Loopback,
                proxy_address: self.address(Side::Proxy),
                backend_address: self.address(Side::Backend),
                client_address: self.address(Side::Client),
                mtu: std::fs::read_to_string("/sys/class/net/lo/mtu")
                    .ok()
                    .and_then(|t| t.trim().parse().ok()),
                links: Vec::new(),
                offloads_note: None,
                raw: String::new(),
            },
            Topology::Veth(net) => net.describe(self),
        }
    }
}

impl VethNet {
    fn create(plan: VethPlan) -> Result<VethNet> {
        if !nix::unistd::geteuid().is_root() {
            return Err(BenchError::Usage(
                "--topology veth creates network namespaces and veth pairs, which needs root: run it as root (e.g. sudo scripts/compare --topology veth)".into(),
            ));
        }
        remove_stale();
        // From here on, dropping `net` deletes whatever the steps made.
        let net = VethNet { plan };
        for step in net.plan.steps() {
            match step {
                Step::Ip(arguments) => run_ip(&arguments)?,
                Step::Forwarding(side) => net.enable_forwarding(side)?,
            }
        }
        Ok(net)
    }

    fn enable_forwarding(&self, side: Side) -> Result<()> {
        const KEY: &str = "/proc/sys/net/ipv4/ip_forward";
        run_in_namespace(&self.plan.namespace(side), || {
            std::fs::write(KEY, "1").map_err(file_context(KEY))
        })
    }

    fn describe(&self, topology: &Topology) -> TopologyInfo {
        let mut raw = String::new();
        let mut missing_ethtool = None;
        let links = LINKS
            .iter()
            .map(|link| {
                let namespace = self.plan.namespace(link.side);
                let shown = output("ip", &["-n", &namespace, "-o", "link", "show", "dev", link.device]);
                let offloads = match output("ip", &["netns", "exec", &namespace, "ethtool", "-k", link.device]) {
                    Ok(text) => {
                        raw += &format!("== {namespace}: ethtool -k {}\n{text}\n", link.device);
                        parse_offloads(&text)
                    }
                    Err(why) => {
                        missing_ethtool = Some(format!("offloads not recorded: ethtool -k failed ({why}); Debian package ethtool"));
                        BTreeMap::new()
                    }
                };
                LinkInfo {
                    side: link.side,
                    namespace,
                    device: link.device,
                    address: format!("{}/{LINK_PREFIX}", link.address),
                    peer: link.peer,
                    mtu: shown.ok().as_deref().and_then(parse_mtu),
                    offloads,
                }
            })
            .collect();
        for namespace in self.plan.namespaces() {
            for what in [&["addr"][..], &["route"][..]] {
                let mut arguments = vec!["-n", &namespace];
                arguments.extend_from_slice(what);
                let text = output("ip", &arguments).unwrap_or_else(|e| e);
                raw += &format!("== {namespace}: ip {}\n{text}\n", what.join(" "));
            }
        }
        TopologyInfo {
            kind: TopologyKind::Veth,
            proxy_address: topology.address(Side::Proxy),
            backend_address: topology.address(Side::Backend),
            client_address: topology.address(Side::Client),
            mtu: Some(self.plan.mtu),
            links,
            offloads_note: missing_ethtool,
            raw,
        }
    }
}

impl Drop for VethNet {
    fn drop(&mut self) {
        for arguments in self.plan.teardown() {
            let _ = run_ip(&arguments);
        }
    }
}

/// Deletes namespaces of earlier runs whose process is gone.
fn remove_stale() {
    let Ok(listing) = output("ip", &["netns", "list"]) else { return };
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for name in stale_namespaces(&listing, alive) {
        eprintln!("[topology] deleting namespace {name} left by an earlier run");
        let _ = run_ip(&args(&["netns", "delete", &name]));
    }
}

fn run_ip(arguments: &[String]) -> Result<()> {
    let result = Command::new("ip")
        .args(arguments)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .map_err(io_context("running ip (Debian package iproute2)"))?;
    if result.status.success() {
        return Ok(());
    }
    Err(BenchError::Usage(format!(
        "ip {} failed ({}): {}",
        arguments.join(" "),
        result.status,
        String::from_utf8_lossy(&result.stderr).trim()
    )))
}

/// Standard output of a command, or why there is none.
fn output(program: &str, arguments: &[&str]) -> std::result::Result<String, String> {
    let result = Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&result.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(step: &Step) -> String {
        match step {
            Step::Ip(arguments) => format!("ip {}", arguments.join(" ")),
            Step::Forwarding(side) => format!("forwarding in {}", side.name()),
        }
    }

    #[test]
    fn set_up_builds_three_namespaces_joined_by_two_pairs() {
        let plan = VethPlan { run: 4242, mtu: 9000 };
        let steps: Vec<String> = plan.steps().iter().map(words).collect();
        let expected = [
            "ip netns add sluice-bench-4242-client",
            "ip netns add sluice-bench-4242-proxy",
            "ip netns add sluice-bench-4242-backend",
            "ip link add name veth-c netns sluice-bench-4242-client mtu 9000 type veth peer name veth-pc netns sluice-bench-4242-proxy mtu 9000",
            "ip link add name veth-pb netns sluice-bench-4242-proxy mtu 9000 type veth peer name veth-b netns sluice-bench-4242-backend mtu 9000",
            "ip -n sluice-bench-4242-client addr add 10.250.1.1/24 dev veth-c",
            "ip -n sluice-bench-4242-client link set dev veth-c up",
            "ip -n sluice-bench-4242-proxy addr add 10.250.1.2/24 dev veth-pc",
            "ip -n sluice-bench-4242-proxy link set dev veth-pc up",
            "ip -n sluice-bench-4242-proxy addr add 10.250.2.1/24 dev veth-pb",
            "ip -n sluice-bench-4242-proxy link set dev veth-pb up",
            "ip -n sluice-bench-4242-backend addr add 10.250.2.2/24 dev veth-b",
            "ip -n sluice-bench-4242-backend link set dev veth-b up",
            "ip -n sluice-bench-4242-client link set dev lo up",
            "ip -n sluice-bench-4242-proxy link set dev lo up",
            "ip -n sluice-bench-4242-backend link set dev lo up",
            "ip -n sluice-bench-4242-client route add 10.250.2.0/24 via 10.250.1.2",
            "ip -n sluice-bench-4242-backend route add 10.250.1.0/24 via 10.250.2.1",
            "forwarding in proxy",
        ];
        assert_eq!(steps, expected);
    }

    #[test]
    fn teardown_deletes_every_namespace_it_made() {
        let plan = VethPlan { run: 7, mtu: DEFAULT_VETH_MTU };
        let made: Vec<String> = plan
            .steps()
            .iter()
            .filter_map(|s| match s {
                Step::Ip(a) if a[..2] == ["netns", "add"] => Some(a[2].clone()),
                _ => None,
            })
            .collect();
        let deleted: Vec<String> = plan.teardown().iter().map(|a| a[2].clone()).collect();
        assert_eq!(made, deleted);
        assert!(plan.teardown().iter().all(|a| a[..2] == ["netns", "delete"]));
    }

    #[test]
    fn every_address_is_in_the_private_network_and_pairs_share_a_subnet() {
        for link in LINKS {
            assert!(in_veth_network(link.address.into()), "{link:?}");
            let peer = LINKS.iter().find(|l| l.device == link.peer).unwrap();
            assert_eq!(peer.peer, link.device);
            assert_eq!(subnet(peer.address), subnet(link.address));
            assert_ne!(peer.side, link.side);
        }
        assert!(!in_veth_network("10.251.0.1".parse().unwrap()));
        assert!(!in_veth_network("127.0.0.1".parse().unwrap()));
        assert!(!in_veth_network("::1".parse().unwrap()));
        assert_eq!(veth_address(Side::Proxy), Ipv4Addr::new(10, 250, 1, 2));
        assert_eq!(veth_address(Side::Backend), Ipv4Addr::new(10, 250, 2, 2));
        assert_eq!(veth_address(Side::Client), Ipv4Addr::new(10, 250, 1, 1));
        assert_eq!(Topology::Loopback.address(Side::Backend), IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn proxies_start_through_ip_netns_exec() {
        let plan = VethPlan { run: 99, mtu: 1500 };
        let mut haproxy = Command::new("/usr/sbin/haproxy");
        haproxy.arg("-db").arg("-f").arg("/tmp/x.cfg");
        let wrapped = plan.command(Side::Proxy, haproxy);
        assert_eq!(wrapped.get_program(), "ip");
        let words: Vec<_> = wrapped.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            words,
            [
                "netns",
                "exec",
                "sluice-bench-99-proxy",
                "/usr/sbin/haproxy",
                "-db",
                "-f",
                "/tmp/x.cfg"
            ]
        );
        let plain = Topology::Loopback.command(Side::Proxy, Command::new("nginx"));
        assert_eq!(plain.get_program(), "nginx");
    }

    #[test]
    fn only_namespaces_of_dead_runs_are_stale() {
        let listing = "sluice-bench-100-client (id: 3)\nsluice-bench-100-proxy\nsluice-bench-200-backend (id: 5)\nblue\nsluice-bench-x-client\n";
        let stale = stale_namespaces(listing, |pid| pid == 200);
        assert_eq!(stale, ["sluice-bench-100-client", "sluice-bench-100-proxy"]);
        assert!(stale_namespaces("", |_| false).is_empty());
    }

    #[test]
    fn report_section_names_addresses_mtu_and_offloads() {
        let loopback = TopologyInfo {
            kind: TopologyKind::Loopback,
            proxy_address: IpAddr::from([127, 0, 0, 1]),
            backend_address: IpAddr::from([127, 0, 0, 1]),
            client_address: IpAddr::from([127, 0, 0, 1]),
            mtu: Some(65536),
            links: Vec::new(),
            offloads_note: None,
            raw: String::new(),
        };
        assert!(loopback.markdown().contains("on 127.0.0.1 (lo, MTU 65536)"));
        let plan = VethPlan { run: 5, mtu: 1500 };
        let offloads: BTreeMap<String, String> =
            [("tcp-segmentation-offload", "on"), ("generic-receive-offload", "off")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let links = LINKS
            .iter()
            .map(|link| LinkInfo {
                side: link.side,
                namespace: plan.namespace(link.side),
                device: link.device,
                address: format!("{}/24", link.address),
                peer: link.peer,
                mtu: Some(1500),
                offloads: offloads.clone(),
            })
            .collect();
        let veth = TopologyInfo {
            kind: TopologyKind::Veth,
            proxy_address: veth_address(Side::Proxy).into(),
            backend_address: veth_address(Side::Backend).into(),
            client_address: veth_address(Side::Client).into(),
            mtu: Some(1500),
            links,
            offloads_note: None,
            raw: String::new(),
        };
        let text = veth.markdown();
        assert!(text.contains("MTU 1500"), "{text}");
        assert!(text.contains("Proxies listen on 10.250.1.2"), "{text}");
        let row = text.lines().find(|l| l.contains("veth-pb")).unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(
            cells[1..cells.len() - 1],
            [
                "sluice-bench-5-proxy",
                "veth-pb",
                "10.250.2.1/24",
                "veth-b",
                "1500",
                "?",
                "?",
                "on",
                "?",
                "off",
                "?"
            ]
        );
    }

    #[test]
    fn offloads_and_mtu_from_tool_output() {
        let ethtool = "Features for veth-c:\nrx-checksumming: on\ntx-checksumming: on\n\ttx-checksum-ipv4: off [fixed]\nscatter-gather: on\ntcp-segmentation-offload: on\ngeneric-receive-offload: off\n";
        let offloads = parse_offloads(ethtool);
        assert_eq!(offloads["rx-checksumming"], "on");
        assert_eq!(offloads["tx-checksum-ipv4"], "off [fixed]");
        assert_eq!(offloads["generic-receive-offload"], "off");
        assert!(!offloads.contains_key("Features for veth-c"));
        let link = "7: veth-c@if8: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT";
        assert_eq!(parse_mtu(link), Some(1500));
        assert_eq!(parse_mtu("no such device"), None);
    }
}
