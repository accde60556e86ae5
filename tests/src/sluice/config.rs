//! The configuration a test runs sluice with: [`Config`] and its [`Service`]s, written out
//! as TOML (the same keys a user writes).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::admin::AdminAddr;
use crate::ports::{free_addr, free_udp_addr};
use crate::Driver;

/// One `[[service]]`.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<SocketAddr>,
    /// A `[[pool]]` name to send sessions to instead of `backends`.
    pub pool: Option<String>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub fin_timeout: Option<String>,
    /// Raw `key = value` lines added to the service.
    pub keys: Vec<String>,
    /// `protocol = "udp"` when set.
    pub udp: bool,
    pub udp_idle_timeout: Option<String>,
    pub max_sessions: Option<u64>,
    /// The network interface every listen address is bound to, if any.
    pub interface: Option<String>,
}

impl Service {
    /// A service listening on a free 127.0.0.1 port, forwarding to `backends`.
    pub fn new(name: &str, backends: &[SocketAddr]) -> Self {
        Self {
            name: name.to_string(),
            listen: vec![free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))],
            backends: backends.to_vec(),
            pool: None,
            connect_timeout: None,
            idle_timeout: None,
            fin_timeout: None,
            keys: Vec::new(),
            udp: false,
            udp_idle_timeout: None,
            max_sessions: None,
            interface: None,
        }
    }

    /// A service that sends its sessions to the `[[pool]]` called `pool`.
    pub fn with_pool(name: &str, pool: &str) -> Self {
        Self { pool: Some(pool.to_string()), ..Self::new(name, &[]) }
    }

    /// A UDP service listening on a free 127.0.0.1 port, forwarding to `backends`.
    pub fn udp(name: &str, backends: &[SocketAddr]) -> Self {
        let listen = vec![free_udp_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        Self { listen, udp: true, ..Self::new(name, backends) }
    }

    pub fn udp_idle_timeout(mut self, d: &str) -> Self {
        self.udp_idle_timeout = Some(d.to_string());
        self
    }

    /// Caps the service's sessions at `n`.
    pub fn max_sessions(mut self, n: u64) -> Self {
        self.max_sessions = Some(n);
        self
    }

    /// Binds every listen address to the network interface `name`.
    pub fn on_interface(mut self, name: &str) -> Self {
        self.interface = Some(name.to_string());
        self
    }

    /// Adds a raw `key = value` line to the service.
    pub fn key(mut self, line: &str) -> Self {
        self.keys.push(line.to_string());
        self
    }

    /// Also listens on a free port of `ip`.
    pub fn also_listen(mut self, ip: IpAddr) -> Self {
        self.listen.push(free_addr(ip));
        self
    }

    pub fn connect_timeout(mut self, d: &str) -> Self {
        self.connect_timeout = Some(d.to_string());
        self
    }

    pub fn idle_timeout(mut self, d: &str) -> Self {
        self.idle_timeout = Some(d.to_string());
        self
    }

    pub fn fin_timeout(mut self, d: &str) -> Self {
        self.fin_timeout = Some(d.to_string());
        self
    }

    fn repick_listen(&mut self) {
        let pick = if self.udp { free_udp_addr } else { free_addr };
        for addr in &mut self.listen {
            *addr = pick(addr.ip());
        }
    }
}

/// A sluice configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    pub driver: Driver,
    pub workers: usize,
    pub pin: bool,
    pub pipe_size: Option<String>,
    pub shutdown_timeout: Option<String>,
    /// `engine.max_sessions`.
    pub max_sessions: Option<u64>,
    /// RLIMIT_NOFILE (soft and hard) of the sluice process, set through `prlimit`.
    pub fd_limit: Option<u64>,
    /// A soft RLIMIT_NOFILE below `fd_limit` (the hard limit then).
    pub fd_soft_limit: Option<u64>,
    /// Run sluice without CAP_SYS_RESOURCE (through `setpriv`), as an unprivileged process
    /// sees the kernel's limits.
    pub without_sys_resource: bool,
    pub services: Vec<Service>,
    /// The `[admin]` section's `listen`, if the config has one.
    pub admin: Option<AdminAddr>,
    /// Raw `key = value` lines added to the `[admin]` section.
    pub admin_keys: Vec<String>,
    /// Raw TOML appended after the services, each beginning with a table header
    /// (`[records]`, `[[log]]`, ...).
    pub sections: Vec<String>,
    /// Extra `key = value` lines of the `[engine]` section.
    pub engine_keys: Vec<String>,
    /// Environment variables set for the process (besides `RUNTIME_DIRECTORY`, always its
    /// temp dir, where its pid file and control socket go).
    pub env: Vec<(String, String)>,
    /// The binary to run instead of [`super::binary`].
    pub binary: Option<PathBuf>,
    /// A network namespace to run sluice in (`ip netns exec NAME`), one a test made.
    pub netns: Option<String>,
    /// `engine.relay`, when a test sets it apart from the driver variant's.
    pub relay: Option<&'static str>,
}

impl Config {
    /// Two workers on `driver`, no services yet.
    pub fn new(driver: Driver) -> Self {
        Self {
            driver,
            workers: 2,
            pin: true,
            pipe_size: None,
            shutdown_timeout: None,
            max_sessions: None,
            fd_limit: None,
            fd_soft_limit: None,
            without_sys_resource: false,
            services: Vec::new(),
            admin: None,
            admin_keys: Vec::new(),
            sections: Vec::new(),
            engine_keys: Vec::new(),
            env: Vec::new(),
            binary: None,
            netns: None,
            relay: None,
        }
    }

    /// Sets `engine.relay` to `relay` instead of the driver variant's.
    pub fn relay(mut self, relay: &'static str) -> Self {
        self.relay = Some(relay);
        self
    }

    /// Runs sluice in the network namespace `name` (see [`crate::Netns`]).
    pub fn in_netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

    /// Sets an environment variable for the sluice process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs `path` instead of the built binary.
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Runs sluice with a soft RLIMIT_NOFILE of `soft` under a hard one of `hard`.
    pub fn fd_limits(mut self, soft: u64, hard: u64) -> Self {
        self.fd_limit = Some(hard);
        self.fd_soft_limit = Some(soft);
        self
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Adds `key = value` (TOML) to the `[engine]` section, e.g. `("max_flows", "64")`.
    pub fn engine_key(mut self, key: &str, value: &str) -> Self {
        self.engine_keys.push(format!("{key} = {value}"));
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Caps the sessions of the whole engine at `n`.
    pub fn max_sessions(mut self, n: u64) -> Self {
        self.max_sessions = Some(n);
        self
    }

    /// Runs sluice with RLIMIT_NOFILE lowered to `n` (through `prlimit`, util-linux).
    pub fn fd_limit(mut self, n: u64) -> Self {
        self.fd_limit = Some(n);
        self
    }

    /// Runs sluice without CAP_SYS_RESOURCE (through `setpriv`, util-linux), so limits such
    /// as fs.pipe-max-size apply to it as to an unprivileged process.
    pub fn without_sys_resource(mut self) -> Self {
        self.without_sys_resource = true;
        self
    }

    pub fn shutdown_timeout(mut self, d: &str) -> Self {
        self.shutdown_timeout = Some(d.to_string());
        self
    }

    /// An `[admin]` section listening on a free 127.0.0.1 port.
    pub fn admin_tcp(mut self) -> Self {
        self.admin = Some(AdminAddr::Tcp(free_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))));
        self
    }

    /// An `[admin]` section listening on a free port of `ip` (`0.0.0.0` for every
    /// address; tests still connect through loopback only).
    pub fn admin_tcp_on(mut self, ip: IpAddr) -> Self {
        self.admin = Some(AdminAddr::Tcp(free_addr(ip)));
        self
    }

    /// Adds a raw `key = value` line to the `[admin]` section.
    pub fn admin_key(mut self, line: &str) -> Self {
        self.admin_keys.push(line.to_string());
        self
    }

    /// An `[admin]` section listening on the unix socket `path`.
    pub fn admin_unix(mut self, path: &Path) -> Self {
        self.admin = Some(AdminAddr::Unix(path.to_path_buf()));
        self
    }

    /// Appends raw TOML; it must begin with a table header such as `[records]` or
    /// `[[log]]`, so that it cannot land inside the last `[[service]]`.
    pub fn section(mut self, toml: &str) -> Self {
        assert!(toml.trim_start().starts_with('['), "a section begins with a header: {toml:?}");
        self.sections.push(toml.to_string());
        self
    }

    /// The service called `name`, to change it before a reload.
    pub fn service_mut(&mut self, name: &str) -> &mut Service {
        let found = self.services.iter_mut().find(|s| s.name == name);
        found.unwrap_or_else(|| panic!("no service {name:?}"))
    }

    /// The TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        let mut t = String::from("[engine]\n");
        t += &format!(
            "workers = {}\npin = {}\ndriver = {:?}\n",
            self.workers,
            self.pin,
            self.driver.as_str()
        );
        if let Some(relay) = self.relay.or(self.driver.relay()) {
            t += &format!("relay = {relay:?}\n");
        }
        if let Some(s) = &self.pipe_size {
            t += &format!("pipe_size = {s:?}\n");
        }
        if let Some(d) = &self.shutdown_timeout {
            t += &format!("shutdown_timeout = {d:?}\n");
        }
        for line in &self.engine_keys {
            t += line;
            t += "\n";
        }
        if let Some(n) = self.max_sessions {
            t += &format!("max_sessions = {n}\n");
        }
        for s in &self.services {
            t += &format!("\n[[service]]\nname = {:?}\n", s.name);
            match &s.interface {
                None => t += &format!("listen = {}\n", toml_list(&s.listen)),
                Some(i) => {
                    let items: Vec<String> = s
                        .listen
                        .iter()
                        .map(|a| format!("{{ addr = \"{a}\", interface = {i:?} }}"))
                        .collect();
                    t += &format!("listen = [{}]\n", items.join(", "));
                }
            }
            match &s.pool {
                Some(pool) => t += &format!("pool = {pool:?}\n"),
                None => t += &format!("backends = {}\n", toml_list(&s.backends)),
            }
            if s.udp {
                t += "protocol = \"udp\"\n";
            }
            for line in &s.keys {
                t += line;
                t += "\n";
            }
            for (key, value) in [
                ("connect_timeout", &s.connect_timeout),
                ("idle_timeout", &s.idle_timeout),
                ("fin_timeout", &s.fin_timeout),
                ("udp_idle_timeout", &s.udp_idle_timeout),
            ] {
                if let Some(v) = value {
                    t += &format!("{key} = {v:?}\n");
                }
            }
            if let Some(n) = s.max_sessions {
                t += &format!("max_sessions = {n}\n");
            }
        }
        if let Some(admin) = &self.admin {
            t += &format!("\n[admin]\nlisten = \"{admin}\"\n");
            for line in &self.admin_keys {
                t += line;
                t += "\n";
            }
        }
        for section in &self.sections {
            t += "\n";
            t += section;
            if !section.ends_with('\n') {
                t += "\n";
            }
        }
        t
    }

    pub(super) fn repick_ports(&mut self) {
        self.services.iter_mut().for_each(Service::repick_listen);
        if let Some(AdminAddr::Tcp(addr)) = &mut self.admin {
            *addr = free_addr(addr.ip());
        }
    }
}

fn toml_list(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}
