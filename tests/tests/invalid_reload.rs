//! RELIABILITY 12, invalid reload: a file with bad TOML, an unknown key or a bad listen
//! address is rejected with `FILE:LINE:COL: key: message` naming the right line and key,
//! the old tables stay in force (a probe connection is still routed as before), and
//! `sluice_reload_failures_total` rises by one per rejection; `POST /reload` answers 422
//! with the same error.

use std::time::Duration;

use sluice_tests::{tagged_round_trip, Backend, Config, Driver, Reload, Service, Sluice};

/// Tags of the backend the running tables use and of the one the bad files name.
const OLD: u8 = b'A';
const NEW: u8 = b'B';
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// One way to spoil a valid file.
struct Defect {
    what: &'static str,
    /// Replaces `find` in the valid file with `with`.
    find: &'static str,
    with: &'static str,
    /// The reported key, and the text at the start of the reported line.
    key: &'static str,
    line_starts: &'static str,
    /// The reported column, where it is certain: the column of this text on that line.
    column_of: Option<&'static str>,
}

const DEFECTS: [Defect; 3] = [
    Defect {
        what: "bad TOML",
        find: "pin = true\n",
        with: "pin = \n",
        key: "engine.pin",
        line_starts: "pin =",
        column_of: None,
    },
    Defect {
        what: "unknown key",
        find: "[[service]]\n",
        with: "[[service]]\ncolour = \"blue\"\n",
        key: "service.colour",
        line_starts: "colour",
        column_of: Some("colour"),
    },
    Defect {
        what: "bad listen address",
        find: "listen = [\"",
        with: "listen = [\"127.0.0.1:99999\", \"",
        key: "service[0].listen",
        line_starts: "listen =",
        column_of: Some("\"127.0.0.1:99999\""),
    },
];

/// The file text with `defect`, and the line (1-based) and column it must be reported at.
fn spoil(valid: &str, defect: &Defect) -> (String, usize, Option<usize>) {
    assert_eq!(
        valid.matches(defect.find).count(),
        1,
        "{}: {:?} in {valid}",
        defect.what,
        defect.find
    );
    let text = valid.replacen(defect.find, defect.with, 1);
    let (index, line) =
        text.lines().enumerate().find(|(_, l)| l.starts_with(defect.line_starts)).unwrap_or_else(
            || panic!("{}: no line starts with {:?}", defect.what, defect.line_starts),
        );
    let column = defect.column_of.map(|c| line.find(c).expect("column text on the line") + 1);
    (text, index + 1, column)
}

/// A sluice routing "web" to backend A, with the admin API; and the valid file text that
/// would route it to B instead.
fn start(driver: Driver, old: &Backend, new: &Backend) -> Option<(Sluice, String)> {
    let config = Config::new(driver).admin_tcp().service(Service::new("web", &[old.addr()]));
    let sluice = Sluice::start(config.clone())?;
    let mut next = config;
    next.service_mut("web").backends = vec![new.addr()];
    Some((sluice, next.to_toml()))
}

fn reload_failures(sluice: &Sluice) -> f64 {
    sluice.admin().metrics().get("sluice_reload_failures_total", &[])
}

/// Asserts that `errors` is exactly one `FILE:LINE:COL: key: message` line for `defect`.
fn assert_reported(
    errors: &[String],
    file: &str,
    defect: &Defect,
    line: usize,
    column: Option<usize>,
) {
    assert_eq!(errors.len(), 1, "{}: {errors:#?}", defect.what);
    let rest = errors[0]
        .strip_prefix(file)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{}: does not start with {file}: {}", defect.what, errors[0]));
    let mut parts = rest.splitn(4, ": ");
    let (position, key, message) = (parts.next(), parts.next(), parts.next());
    let position = position.unwrap_or_default();
    let (reported_line, reported_column) = position.split_once(':').expect("LINE:COL");
    assert_eq!(reported_line.parse::<usize>().ok(), Some(line), "{}: {}", defect.what, errors[0]);
    let reported_column: usize = reported_column.parse().expect("column number");
    if let Some(column) = column {
        assert_eq!(reported_column, column, "{}: {}", defect.what, errors[0]);
    }
    assert_eq!(key, Some(defect.key), "{}: {}", defect.what, errors[0]);
    assert!(
        message.is_some_and(|m| !m.trim().is_empty()),
        "{}: no message: {}",
        defect.what,
        errors[0]
    );
}

/// For each defect, SIGHUP: the log shows the rejection at the right line and key, a probe
/// is still served by the old backend, and the failure counter has risen by exactly one.
fn rejected_reload_names_line_and_key_and_keeps_the_old_tables(driver: Driver) {
    let (old, new) = (Backend::tagged_echo(OLD), Backend::tagged_echo(NEW));
    let Some((sluice, valid)) = start(driver, &old, &new) else { return };
    let file = sluice.config_path().display().to_string();
    assert_eq!(reload_failures(&sluice), 0.0);

    for (n, defect) in DEFECTS.iter().enumerate() {
        let (text, line, column) = spoil(&valid, defect);
        sluice.write_config_text(&text);
        let Reload::Rejected(errors) = sluice.reload(RELOAD_TIMEOUT) else {
            panic!("{}: the file was applied:\n{text}", defect.what);
        };
        assert_reported(&errors, &file, defect, line, column);
        let (tag, _) = tagged_round_trip(sluice.addr("web"), b"probe");
        assert_eq!(tag, OLD, "{}: the probe was not routed by the old tables", defect.what);
        assert_eq!(reload_failures(&sluice), (n + 1) as f64, "after {}", defect.what);
    }
    assert_eq!(new.accepted(), 0, "the backend of the rejected files was reached");
}

/// `POST /reload` with each bad file answers 422 with a JSON error that holds the same
/// `FILE:LINE:COL: key: message` line; the old tables stay in force; the failure counter
/// rises by one each time.
fn post_reload_with_a_bad_file_answers_422_with_the_error(driver: Driver) {
    let (old, new) = (Backend::tagged_echo(OLD), Backend::tagged_echo(NEW));
    let Some((sluice, valid)) = start(driver, &old, &new) else { return };
    let file = sluice.config_path().display().to_string();

    for (n, defect) in DEFECTS.iter().enumerate() {
        let (text, line, column) = spoil(&valid, defect);
        sluice.write_config_text(&text);
        let answer = sluice.admin().post("/reload");
        assert_eq!(answer.status, 422, "{}: {}", defect.what, answer.text());
        let error = answer.json()["error"].as_str().expect("a JSON error").to_string();
        let errors: Vec<String> = error.lines().map(str::to_string).collect();
        assert_reported(&errors, &file, defect, line, column);
        assert_eq!(tagged_round_trip(sluice.addr("web"), b"probe").0, OLD, "after {}", defect.what);
        assert_eq!(reload_failures(&sluice), (n + 1) as f64, "after {}", defect.what);
    }
    assert_eq!(new.accepted(), 0, "the backend of the rejected files was reached");
}

/// Issue 26 item 11: a config path that is not a regular file could hang the control
/// thread (a FIFO blocks a plain open until a writer comes): the reload is now refused at
/// once, saying what the path is, the old tables stay, and SIGTERM still stops sluice.
fn a_reload_from_a_fifo_is_refused_at_once(driver: Driver) {
    let (old, new) = (Backend::tagged_echo(OLD), Backend::tagged_echo(NEW));
    let Some((mut sluice, _valid)) = start(driver, &old, &new) else { return };
    let path = sluice.config_path();
    std::fs::remove_file(&path).expect("remove the config file");
    let made = std::process::Command::new("mkfifo").arg(&path).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
    let Reload::Rejected(errors) = sluice.reload(Duration::from_secs(2)) else {
        panic!("a FIFO was read as a config")
    };
    assert!(
        errors.iter().any(|e| e.contains("(file): is a FIFO, not a regular file")),
        "{errors:?}"
    );
    assert_eq!(tagged_round_trip(sluice.addr("web"), b"probe").0, OLD);
    let status = sluice.terminate(Duration::from_secs(5));
    assert!(status.success(), "{status}");
}

// A file is read, checked and refused before any driver sees it: once is enough.
sluice_tests::driver_independent!(
    rejected_reload_names_line_and_key_and_keeps_the_old_tables,
    post_reload_with_a_bad_file_answers_422_with_the_error,
    a_reload_from_a_fifo_is_refused_at_once
);
