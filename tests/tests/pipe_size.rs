//! Issue 26 item 15: a `pipe_size` above what the system allows this process
//! (fs.pipe-max-size without CAP_SYS_RESOURCE) silently kept the kernel's 64 KiB pipes.
//! Now the pipes of the splice and auto relays take the largest size allowed and sluice says
//! so once, with the figure in force; the copy relay, which uses no pipe, says nothing.

use std::time::Duration;

use sluice_tests::{echo_round_trip, Backend, Config, Driver, Service, Sluice};

const WARNING: &str = "engine.pipe_size 4194304 bytes is more than this process may set";

fn a_pipe_size_above_the_limit_is_logged_once_with_the_size_in_force(driver: Driver) {
    let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .expect("fs.pipe-max-size")
        .trim()
        .parse()
        .expect("a number");
    assert!(max < 4 << 20, "this test needs fs.pipe-max-size under 4 MiB (it is {max})");
    let echo = Backend::echo();
    let mut config =
        Config::new(driver).without_sys_resource().service(Service::new("p", &[echo.addr()]));
    config.pipe_size = Some("4 MiB".into());
    let Some(mut sluice) = Sluice::start(config) else { return };
    echo_round_trip(sluice.addr("p"), 7, 3 << 20);
    let warnings: Vec<String> = sluice.logs().into_iter().filter(|l| l.contains(WARNING)).collect();
    if driver.relay() != Some("copy") {
        assert_eq!(warnings.len(), 1, "one warning: {:?}", sluice.logs());
        let in_force = format!("pipes are {max} bytes");
        assert!(warnings[0].contains(&in_force), "{}", warnings[0]);
        assert!(warnings[0].contains(&format!("fs.pipe-max-size is {max} bytes")));
    } else {
        assert!(warnings.is_empty(), "no pipes on the copy relay: {warnings:?}");
    }
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status}");
}

sluice_tests::for_each_driver!(a_pipe_size_above_the_limit_is_logged_once_with_the_size_in_force);
