//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by its
//! `chromedriver`) against a running sluice with traffic: the page loads with Basic
//! credentials and takes the read token typed into its login form, shows what `/stats` says, drains a backend when its button
//! is pressed (asking for the write token, typed on the keyboard) after which new sessions
//! avoid it, cuts a live connection by keyboard (the client sees a reset), shows a refused
//! reload's errors with file, line and key, and draws the topology and charts. Screenshots
//! go to `$SLUICE_SCREENSHOTS` (the README's come from there, taken after
//! `$SLUICE_SCREENSHOT_WARMUP_SECS` of traffic) or the test's scratch dir.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_tests::{
    connect, drain, prerequisite, read_exactly, set_timeouts, tagged_round_trip, write_token_file,
    Backend, Browser, Config, Driver, End, ScratchDir, Service, SessionKey, Sluice, READ_TOKEN,
    WRITE_TOKEN,
};

/// Starts sluice on io_uring (epoll where io_uring is unavailable).
fn start(config: impl Fn(Driver) -> Config) -> Sluice {
    Sluice::start(config(Driver::Uring))
        .unwrap_or_else(|| Sluice::start(config(Driver::Epoll)).expect("epoll runs"))
}

fn open_session(addr: std::net::SocketAddr) -> TcpStream {
    let mut c = connect(addr);
    c.write_all(b"hold").unwrap();
    read_exactly(&mut c, 4);
    c
}

fn text_of(browser: &Browser, css: &str) -> String {
    browser
        .eval(&format!("document.querySelector({css:?})?.textContent ?? ''"))
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn the_dashboard_shows_and_acts_in_a_real_browser() {
    if !prerequisite(
        Browser::available(),
        "chromium and chromedriver (Debian packages chromium, chromium-driver)",
    ) {
        return;
    }
    let dir = ScratchDir::new();
    let (a, b) = (Backend::tagged_echo(b'A'), Backend::tagged_echo(b'B'));
    let api = Backend::echo();
    let token_line = write_token_file(dir.path());
    let sluice = start(|driver| {
        Config::new(driver)
            .admin_tcp()
            .admin_key(&token_line)
            .service(Service::new("web", &[a.addr(), b.addr()]))
            .service(
                Service::new("api", &[api.addr()])
                    .key("[[service.rule]]\nname = \"no-127.0.0.2\"\naction = \"deny\"\nfrom = [\"127.0.0.2\"]"),
            )
    });
    let admin = sluice.admin().with_token(READ_TOKEN);
    // Traffic: round trips through web, and denied connections to api, until stopped.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let (running, web, api_addr) = (running.clone(), sluice.addr("web"), sluice.addr("api"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) && n < 20_000 {
                tagged_round_trip(web, &n.to_le_bytes());
                if n % 10 == 0 {
                    let _ = sluice_tests::connect_from([127, 0, 0, 2].into(), api_addr);
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };

    let browser = Browser::start(1400, 2200);
    let port = admin.tcp_addr().port();
    // The page itself: Basic credentials in the URL (as a browser's login prompt sends
    // them). Its data: the page asks for the token and keeps it for the session.
    browser.goto(&format!("http://operator:{READ_TOKEN}@127.0.0.1:{port}/"));
    browser.wait_for("document.title === 'sluice'", Duration::from_secs(15));
    let asked = browser.wait_for(
        "document.body.dataset.ready === '1' || (!document.getElementById('login').hidden && document.activeElement.id === 'token')",
        Duration::from_secs(15),
    );
    assert_eq!(asked, json!(true));
    if browser.eval("document.body.dataset.ready === '1'") != json!(true) {
        browser.keys(&format!("{READ_TOKEN}\u{E007}"));
    }
    browser.wait_for("document.body.dataset.ready === '1'", Duration::from_secs(15));
    // More history for the charts of the README's screenshots; 2.5 s otherwise.
    let warmup = std::env::var("SLUICE_SCREENSHOT_WARMUP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.5);
    std::thread::sleep(Duration::from_secs_f64(warmup));
    // Opened after the warm-up: the test backends close connections idle for long.
    let _held: Vec<TcpStream> = (0..3).map(|_| open_session(sluice.addr("api"))).collect();
    let mut victim = open_session(sluice.addr("api"));
    let victim_key = SessionKey::of(&victim);

    // What it shows agrees with /stats (compared while the page refreshes each second).
    let stats = admin.stats();
    assert_eq!(text_of(&browser, "#f-version"), stats["version"].as_str().unwrap());
    assert_eq!(text_of(&browser, "#f-driver"), stats["driver"].as_str().unwrap());
    let rows = browser.eval(
        "[...document.querySelectorAll('#services tbody tr')].map(r => r.cells[0].textContent)",
    );
    assert_eq!(rows, json!(["web", "api"]));
    let api_active = browser.wait_for(
        "[...document.querySelectorAll('#services tbody tr')].find(r => r.cells[0].textContent === 'api')?.cells[2].textContent === '4'",
        Duration::from_secs(5),
    );
    assert_eq!(api_active, json!(true), "api shows 4 active sessions");
    assert_eq!(admin.stats()["services"][1]["active"], 4);
    let backends = browser.eval("[...document.querySelectorAll('#backends tbody tr')].map(r => r.cells[1].textContent + ' ' + r.cells[2].textContent)");
    assert_eq!(
        backends,
        json!([
            format!("{} enabled", a.addr()),
            format!("{} enabled", b.addr()),
            format!("{} enabled", api.addr())
        ])
    );
    let denied = browser.wait_for("[...document.querySelectorAll('#denials tbody tr')].some(r => r.cells[2].textContent.startsWith('127.0.0.2:'))", Duration::from_secs(5));
    assert_eq!(denied, json!(true));
    let rule = browser.eval("[...document.querySelectorAll('#rules tbody tr')].find(r => r.cells[1].textContent === 'no-127.0.0.2')?.cells[3].textContent");
    let hits = admin.stats()["services"][1]["rules"][0]["hits"].as_u64().unwrap();
    let shown: u64 = rule.as_str().unwrap_or("0").replace(',', "").parse().unwrap();
    assert!(shown > 0 && shown <= hits, "rule hits shown {shown}, /stats {hits}");
    let topology = text_of(&browser, "#topology");
    for addr in [a.addr(), b.addr(), api.addr()] {
        assert!(topology.contains(&addr.to_string()), "topology shows {addr}: {topology}");
    }
    let drawn = browser.eval("document.querySelectorAll('#chart-new path').length");
    assert_eq!(drawn, json!(1), "the sessions chart has its line");
    let shots = std::env::var_os("SLUICE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    browser.screenshot(&shots.join("dashboard.png"));

    // Drain backend A with the mouse: the read token does not allow it, so the page asks for
    // the write token, typed on the keyboard; then new sessions avoid A.
    browser.click(&format!("button[aria-label='drain backend {} of web']", a.addr()));
    browser.wait_for(
        "!document.getElementById('login').hidden && document.activeElement.id === 'token'",
        Duration::from_secs(5),
    );
    browser.keys(&format!("{WRITE_TOKEN}\u{E007}"));
    let state = admin.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while state.stats()["services"][0]["backends"][0]["state"] != "draining" {
        assert!(std::time::Instant::now() < deadline, "drain never applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    browser.wait_for(&format!("[...document.querySelectorAll('#backends tbody tr')].some(r => r.cells[1].textContent === '{}' && r.cells[2].textContent === 'draining')", a.addr()), Duration::from_secs(5));
    let accepted = a.accepted();
    let tags: Vec<u8> = (0..10u8).map(|i| tagged_round_trip(sluice.addr("web"), &[i]).0).collect();
    assert_eq!(tags, vec![b'B'; 10], "new sessions avoid the drained backend");
    assert_eq!(a.accepted(), accepted);

    // Cut the victim by keyboard: filter with '/', focus its cut button, Enter twice.
    browser.eval("document.activeElement.blur()");
    browser.keys("/");
    browser.keys(&victim_key.client.to_string());
    browser.wait_for(
        "document.querySelectorAll('#conns tbody tr[data-id]').length === 1",
        Duration::from_secs(5),
    );
    browser.eval("document.querySelector('#conns tbody tr[data-id] button').focus()");
    browser.keys("\u{E007}");
    browser.wait_for(
        "document.querySelector('#conns tbody tr[data-id] button').textContent === 'Confirm cut'",
        Duration::from_secs(3),
    );
    browser.keys("\u{E007}");
    set_timeouts(&victim, Duration::from_secs(3));
    assert_eq!(drain(&mut victim).end, End::Reset, "the client sees its connection cut");
    let record =
        sluice.wait_for_session(victim_key, Duration::from_secs(5)).expect("a close record");
    assert_eq!(record.reason, "admin_kill");
    browser.wait_for(
        "document.getElementById('status').textContent.includes('cut (admin_kill)')",
        Duration::from_secs(5),
    );
    browser.screenshot(&shots.join("dashboard-actions.png"));

    // A refused reload, pressed with the 'r' key: its errors with file, line and key.
    let good = std::fs::read_to_string(sluice.config_path()).unwrap();
    sluice.write_config_text(&good.replacen(
        "[[service]]\n",
        "[[service]]\nconnect_timeout = \"never\"\n",
        1,
    ));
    browser.eval("document.activeElement.blur()");
    browser.keys("r");
    browser.wait_for("!document.getElementById('reload-errors').hidden", Duration::from_secs(5));
    let error: Value = browser.eval(
        "[...document.querySelectorAll('#reload-error-rows tr')[0].cells].map(c => c.textContent)",
    );
    let config_path = sluice.config_path().display().to_string();
    assert_eq!(error[0], json!(config_path));
    assert!(
        error[1].as_str().is_some_and(|l| l.parse::<u32>().is_ok_and(|n| n > 0)),
        "a line: {error}"
    );
    assert_eq!(error[3], json!("service[0].connect_timeout"));
    browser.screenshot(&shots.join("dashboard-reload-error.png"));
    assert_eq!(admin.stats()["reload_failures"], 1);

    running.store(false, Ordering::Relaxed);
    let made = traffic.join().unwrap();
    println!("{made} round trips during the test; screenshots in {}", shots.display());
}
