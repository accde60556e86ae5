//! `[engine] user`: sluice started as root binds every listener, ports below 1024 included,
//! then runs as that user for good, with no capability (/proc/PID/status: Uid, Gid, Groups,
//! CapPrm, CapEff, CapAmb, NoNewPrivs). Afterwards a reload that adds a port of 1024 or above
//! works; one that adds a port below 1024 is rejected with a message that says why and what
//! to do; an upgrade works (the new process inherits the sockets, so it needs no privilege)
//! and runs as the same user.
//!
//! Needs root and `useradd`/`userdel` (passwd): without them the test is skipped, or fails
//! under CI=true.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use sluice_tests::{
    free_addr, status_field, tagged_round_trip, Adopted, Backend, Config, Driver, Reload, Service,
    Sluice,
};

/// A system user made for the test, removed when dropped.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    /// `None` (after saying why) when the test cannot create one; panics under CI=true.
    fn create() -> Option<TestUser> {
        let missing = if !nix::unistd::geteuid().is_root() {
            Some("the test does not run as root")
        } else if !std::path::Path::new("/usr/sbin/useradd").exists() {
            Some("useradd (Debian package passwd) is missing")
        } else {
            None
        };
        if let Some(why) = missing {
            sluice_tests::skip(why);
            return None;
        }
        let name = format!("sluicet{}", std::process::id() % 100_000);
        let status = Command::new("/usr/sbin/useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name}: {status}");
        let user = nix::unistd::User::from_name(&name).expect("getpwnam").expect("the new user");
        Some(TestUser { name, uid: user.uid.as_raw(), gid: user.gid.as_raw() })
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("/usr/sbin/userdel").arg(&self.name).status();
    }
}

/// A free loopback port below 1024.
fn privileged_addr() -> SocketAddr {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1024)
        .chain(600..start)
        .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
        .find(|a| TcpListener::bind(a).is_ok())
        .expect("a free port below 1024")
}

/// The ids and capabilities of `pid` are `user`'s and none.
fn runs_as(pid: u32, user: &TestUser) {
    let ids = |key| status_field(pid, key).unwrap_or_else(|| panic!("no {key} for pid {pid}"));
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    assert_eq!(
        ids("Uid").split_whitespace().collect::<Vec<_>>(),
        [&uid; 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        ids("Gid").split_whitespace().collect::<Vec<_>>(),
        [&gid; 4],
        "real, effective, saved, fs gid"
    );
    assert_eq!(ids("Groups"), gid, "supplementary groups");
    for caps in ["CapPrm", "CapEff", "CapAmb", "CapInh"] {
        assert_eq!(u64::from_str_radix(&ids(caps), 16), Ok(0), "{caps} of pid {pid}");
    }
    assert_eq!(ids("NoNewPrivs"), "1");
}

#[test]
fn root_binds_below_1024_then_runs_as_the_user_through_reload_and_upgrade() {
    let Some(user) = TestUser::create() else { return };
    let backend = Backend::tagged_echo(b'A');
    let low = privileged_addr();
    let mut service = Service::new("web", &[backend.addr()]);
    service.listen = vec![low];
    let config =
        Config::new(Driver::Epoll).engine_key("user", &format!("{:?}", user.name)).service(service);
    let Some(sluice) = Sluice::start(config.clone()) else { return };
    runs_as(sluice.pid(), &user);
    assert!(sluice.wait_for_log("with no capability", Duration::from_secs(2)).is_some());
    tagged_round_trip(low, b"below 1024");

    // A reload adding a port of 1024 or above: bound by the user, served.
    let mut next = config.clone();
    let high = free_addr(Ipv4Addr::LOCALHOST.into());
    next.service_mut("web").listen.push(high);
    sluice.write_config(&next);
    assert_eq!(sluice.reload(Duration::from_secs(5)), Reload::Applied(2));
    tagged_round_trip(high, b"added after the drop");

    // A reload adding another port below 1024 cannot bind it, and says why.
    let mut denied = next.clone();
    let other_low = privileged_addr();
    denied.service_mut("web").listen.push(other_low);
    sluice.write_config(&denied);
    match sluice.reload(Duration::from_secs(5)) {
        Reload::Rejected(errors) => {
            let all = errors.join("\n");
            assert!(all.contains(&other_low.to_string()) && all.contains("below 1024"), "{all}");
            assert!(all.contains("restart"), "{all}");
        }
        other => panic!("a port below 1024 after the drop was {other:?}"),
    }
    tagged_round_trip(low, b"still served");

    // An upgrade: the new process inherits the sockets and runs as the user too.
    sluice.write_config(&next);
    let pid = sluice.upgrade().expect("upgrade after the drop");
    let successor = Adopted::new(pid);
    runs_as(pid, &user);
    assert!(
        sluice_tests::wait_gone(sluice.pid(), Duration::from_secs(35)),
        "the old process exits"
    );
    tagged_round_trip(low, b"served by the new process");
    tagged_round_trip(high, b"and this one");
    assert!(successor.terminate(Duration::from_secs(10)));
}
