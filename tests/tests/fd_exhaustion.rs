//! fd exhaustion (RELIABILITY.md scenario 10): sluice runs under RLIMIT_NOFILE=256 and gets
//! 1,000 connection attempts. It must not crash nor busy-loop (under 5% of a core while
//! saturated), must pause accepting and retry with one rate-limited log line and a
//! counter, and must serve again once fds free up.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use sluice_tests::{
    cpu_time, echo_round_trip, raise_fd_limit, try_connect, Backend, Config, Driver, Service,
    Sluice, PRLIMIT,
};

/// RLIMIT_NOFILE of the sluice process.
const FD_LIMIT: u64 = 256;
/// Connection attempts.
const ATTEMPTS: usize = 1000;
/// How long CPU use is measured while saturated.
const CPU_WINDOW: Duration = Duration::from_secs(2);
/// Most CPU allowed while saturated, as a share of one core.
const CPU_SHARE: f64 = 0.05;
/// The warning that accepting paused.
const PAUSED: &str = "accept paused";

fn survives_running_out_of_fds(driver: Driver) {
    let _timing = sluice_tests::timing_bound();
    if !sluice_tests::prerequisite(Path::new(PRLIMIT).exists(), "prlimit (util-linux)") {
        return;
    }
    raise_fd_limit(20_000);
    let (holder, held) = Backend::holds();
    let echo = Backend::echo();
    let config = Config::new(driver)
        .workers(2)
        .fd_limit(FD_LIMIT)
        .shutdown_timeout("2s")
        .admin_tcp()
        .service(Service::new("held", &[holder.addr()]))
        .service(Service::new("echo", &[echo.addr()]));
    let Some(mut sluice) = Sluice::start(config) else { return };
    let addr = sluice.addr("held");
    let clients: Vec<TcpStream> = (0..ATTEMPTS).filter_map(|_| try_connect(addr).ok()).collect();
    let saturated = Instant::now() + Duration::from_secs(10);
    while sluice.fd_count() + 8 < FD_LIMIT as usize && Instant::now() < saturated {
        std::thread::sleep(Duration::from_millis(20));
    }
    let open = sluice.fd_count();
    assert!(open + 8 >= FD_LIMIT as usize, "sluice never ran out of fds: {open} of {FD_LIMIT}");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_time(sluice.pid());
    std::thread::sleep(CPU_WINDOW);
    let used = cpu_time(sluice.pid()) - before;
    let share = used.as_secs_f64() / CPU_WINDOW.as_secs_f64();
    println!("{} of {ATTEMPTS} clients connected; sluice used {used:?} of CPU in {CPU_WINDOW:?} while out of fds", clients.len());
    assert!(share < CPU_SHARE, "{share:.3} of a core while out of fds: a busy loop");
    assert!(sluice.wait_exit(Duration::ZERO).is_none(), "sluice exited out of fds");
    let warnings: Vec<String> = sluice.logs().into_iter().filter(|l| l.contains(PAUSED)).collect();
    assert_eq!(warnings.len(), 1, "one rate-limited warning: {warnings:#?}");
    // "(open fds: 253 of 256; ..." or, with no fd free to count them, "limit 256; ...".
    assert!(warnings[0].contains(&format!(" {FD_LIMIT};")), "the fd limit is named: {warnings:?}");
    // Free everything: the clients, and the backend (stopped first, so that it holds no
    // session that sluice opened meanwhile).
    drop(clients);
    drop(holder);
    held.clear();
    let settled = sluice.wait_for_fd_count(FD_LIMIT as usize / 2, Duration::from_secs(10));
    assert!(settled <= FD_LIMIT as usize / 2, "fds were not given back: {settled} open");
    let echo_addr = sluice.addr("echo");
    let served = (0..50).any(|_| {
        let ok = std::panic::catch_unwind(|| echo_round_trip(echo_addr, 7, 4096)).is_ok();
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(served, "service did not resume once fds freed up");
    // The admin API shares the process's fds; once they are back it answers again.
    let admin = sluice.admin();
    let m = (0..20)
        .find_map(|_| {
            let m = std::panic::catch_unwind(|| admin.metrics()).ok();
            if m.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            m
        })
        .expect("the admin API answers once fds are back");
    let backoffs: f64 = (0..2)
        .map(|w| m.get("sluice_worker_accept_backoffs_total", &[("worker", &w.to_string())]))
        .sum();
    assert!(backoffs >= 1.0, "accept back-offs are counted");
    let status = sluice.terminate(Duration::from_secs(10));
    assert!(status.success(), "sluice exits cleanly after running out of fds: {status}");
}

sluice_tests::for_each_driver!(survives_running_out_of_fds);
