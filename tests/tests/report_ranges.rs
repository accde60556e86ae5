//! `sluice report` over time ranges (issue 22, item 6): known records written by the test,
//! with starts on and around the boundaries, give the accounting tables written out below,
//! as CSV, JSON and text; `--day`/`--previous-day --out-dir` write a dated file atomically
//! and idempotently. Boundaries: `--since` is inclusive, `--until` exclusive, and each
//! bucket holds the sessions that started in `[start, end)`. Times are UTC.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sluice_tests::{binary, ScratchDir};

/// One record line as a `[[log]]` sink with format "json" writes it.
fn record(kind: &str, client: &str, start: &str, up: u64, down: u64) -> String {
    format!(
        r#"{{"kind":"{kind}","start":"{start}","end":"{start}","duration_ms":5,"service":"web","listener":"127.0.0.1:80","client_addr":"{client}","client_port":40000,"backend_addr":"127.0.0.1","backend_port":8000,"bytes_up":{up},"bytes_down":{down},"verdict":"allow","rule":null,"reason":"client_fin","worker":0,"tables_version":1}}"#
    )
}

/// Records of 2026-11-22 around 08:00-10:00 UTC, and one of the day before.
fn write_log(dir: &ScratchDir) -> PathBuf {
    let lines = [
        record("close", "10.0.0.1", "2026-11-21T23:59:59.999Z", 1000, 1000),
        record("close", "10.0.0.1", "2026-11-22T07:59:59.999Z", 1, 2),
        record("close", "10.0.0.1", "2026-11-22T08:00:00.000Z", 100, 1000),
        record("interim", "10.0.0.1", "2026-11-22T08:30:00.000Z", 50, 50),
        record("close", "10.0.0.2", "2026-11-22T08:59:59.999Z", 10, 20),
        record("close", "10.0.1.5", "2026-11-22T09:00:00.000Z", 5, 5),
        record("deny", "10.0.0.2", "2026-11-22T09:30:00.000Z", 0, 0),
        record("close", "10.0.0.1", "2026-11-22T09:59:59.000Z", 7, 3),
        record("close", "10.0.0.1", "2026-11-22T10:00:00.000Z", 9, 9),
        "not a record".to_string(),
    ];
    let path = dir.join("sessions.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("write the log");
    path
}

fn report(args: &[&str], log: &Path) -> Output {
    Command::new(binary()).arg("report").args(args).arg(log).output().expect("run sluice report")
}

fn stdout_of(args: &[&str], log: &Path) -> String {
    let out = report(args, log);
    assert!(
        out.status.success(),
        "sluice report {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// From 08:00 (inclusive) to 10:00 (exclusive), by hour.
const HOURLY_CSV: &str = "\
bucket_start,bucket_end,scope,key,sessions,denials,bytes_up,bytes_down
2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,total,,2,0,110,1020
2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,network,10.0.0.0/24,2,0,110,1020
2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,client,10.0.0.1,1,0,100,1000
2026-11-22T08:00:00Z,2026-11-22T09:00:00Z,client,10.0.0.2,1,0,10,20
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,total,,2,1,12,8
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,network,10.0.0.0/24,1,1,7,3
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,network,10.0.1.0/24,1,0,5,5
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,client,10.0.0.1,1,0,7,3
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,client,10.0.1.5,1,0,5,5
2026-11-22T09:00:00Z,2026-11-22T10:00:00Z,client,10.0.0.2,0,1,0,0
";

/// The whole of 2026-11-22 as one day, networks grouped by /16.
const DAY_CSV: &str = "\
bucket_start,bucket_end,scope,key,sessions,denials,bytes_up,bytes_down
2026-11-22T00:00:00Z,2026-11-23T00:00:00Z,total,,6,1,132,1039
2026-11-22T00:00:00Z,2026-11-23T00:00:00Z,network,10.0.0.0/16,6,1,132,1039
2026-11-22T00:00:00Z,2026-11-23T00:00:00Z,client,10.0.0.1,4,0,117,1014
2026-11-22T00:00:00Z,2026-11-23T00:00:00Z,client,10.0.0.2,1,1,10,20
2026-11-22T00:00:00Z,2026-11-23T00:00:00Z,client,10.0.1.5,1,0,5,5
";

#[test]
fn csv_by_hour_counts_since_inclusive_and_until_exclusive() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    let args = ["--since", "2026-11-22T08:00:00Z", "--until", "2026-11-22T10:00:00Z"];
    let csv = stdout_of(&[&args[..], &["--by", "hour", "--format", "csv"]].concat(), &log);
    assert_eq!(csv, HOURLY_CSV);
    // The same range with offsets names the same instants.
    let offsets = ["--since", "2026-11-22T09:00:00+01:00", "--until", "2026-11-22T05:00:00-05:00"];
    let csv = stdout_of(&[&offsets[..], &["--by", "hour", "--format", "csv"]].concat(), &log);
    assert_eq!(csv, HOURLY_CSV);
}

#[test]
fn a_day_with_its_own_prefixes_sums_every_session_of_that_day() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    let args = ["--since", "2026-11-22", "--until", "2026-11-23", "--format", "csv"];
    let csv = stdout_of(&[&args[..], &["--network-v4", "16"]].concat(), &log);
    assert_eq!(csv, DAY_CSV, "csv defaults to days");
}

#[test]
fn weeks_start_on_monday() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    // 2026-11-22 is a Sunday: its sessions and the day before's share the week of
    // Monday 2026-11-16.
    let csv = stdout_of(&["--by", "week", "--format", "csv"], &log);
    let totals: Vec<&str> = csv.lines().filter(|l| l.contains(",total,")).collect();
    assert_eq!(totals, ["2026-11-16T00:00:00Z,2026-11-23T00:00:00Z,total,,7,1,1132,2039"]);
}

#[test]
fn json_and_text_show_the_range_and_the_buckets() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    let range = ["--since", "2026-11-22T08:00:00Z", "--until", "2026-11-22T10:00:00Z"];
    let json = stdout_of(&[&range[..], &["--by", "hour", "--json"]].concat(), &log);
    let v: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["since"], "2026-11-22T08:00:00Z");
    assert_eq!(v["until"], "2026-11-22T10:00:00Z");
    assert_eq!(v["by"], "hour");
    assert_eq!(v["records"], 5);
    assert_eq!(v["outside_range"], 3);
    assert_eq!(v["skipped_lines"], 1);
    let buckets = v["buckets"].as_array().expect("buckets");
    assert_eq!(buckets.len(), 2);
    assert_eq!(buckets[1]["start"], "2026-11-22T09:00:00Z");
    assert_eq!(buckets[1]["total"]["denials"], 1);
    assert_eq!(buckets[1]["networks"][1]["network"], "10.0.1.0/24");
    assert_eq!(buckets[0]["clients"][0]["client"], "10.0.0.1");
    assert_eq!(buckets[0]["clients"][0]["bytes_down"], 1000);
    let text = stdout_of(&[&range[..], &["--by", "minute"]].concat(), &log);
    assert!(text.contains("sessions started from 2026-11-22T08:00:00Z (inclusive) to 2026-11-22T10:00:00Z (exclusive); 3 records outside"), "{text}");
    assert!(text.contains("minute start (UTC)"), "{text}");
    let row = text.lines().find(|l| l.starts_with("2026-11-22T09:59:00Z") && l.contains("client"));
    let cols: Vec<&str> = row.expect("the 09:59 client row").split_whitespace().collect();
    assert_eq!(cols, ["2026-11-22T09:59:00Z", "client", "10.0.0.1", "1", "0", "7", "3"]);
}

#[test]
fn without_new_options_the_report_is_unchanged() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    let text = stdout_of(&[], &log);
    assert!(text.starts_with("8 records from 1 file(s), 1 lines skipped\n\n"), "{text}");
    assert!(!text.contains("network or client"), "no bucket table without --by: {text}");
    let v: Value = serde_json::from_str(&stdout_of(&["--json"], &log)).expect("JSON");
    assert_eq!(v["records"], 8);
    assert!(v["buckets"].is_null());
    assert_eq!(v["hours"]["2026-11-22T08:00Z"]["sessions"], 2);
}

#[test]
fn out_dir_writes_the_day_atomically_and_idempotently() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    let out = dir.join("reports");
    std::fs::create_dir(&out).expect("mkdir");
    let out_arg = out.to_str().expect("UTF-8 path");
    let args = ["--day", "2026-11-22", "--out-dir", out_arg, "--network-v4", "16"];
    assert_eq!(stdout_of(&args, &log), "", "nothing printed");
    let file = out.join("sluice-report-2026-11-22.csv");
    let first = std::fs::read_to_string(&file).expect("the day's file");
    assert_eq!(first, DAY_CSV);
    // Again: the same file, the same contents, and no temporary file left behind.
    assert_eq!(stdout_of(&args, &log), "");
    assert_eq!(std::fs::read_to_string(&file).expect("the day's file"), first);
    let names: Vec<String> = std::fs::read_dir(&out)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["sluice-report-2026-11-22.csv"]);
    // --format json names the file .json.
    let json_args = ["--day", "2026-11-22", "--out-dir", out_arg, "--format", "json"];
    assert_eq!(stdout_of(&json_args, &log), "");
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("sluice-report-2026-11-22.json")).expect("json file"),
    )
    .expect("JSON");
    assert_eq!(v["by"], "day");
    assert_eq!(v["total"]["sessions"], 6);
}

#[test]
fn previous_day_names_the_file_by_yesterdays_utc_date() {
    let dir = ScratchDir::new();
    let date = Command::new("date").args(["-u", "-d", "yesterday", "+%F"]).output().expect("date");
    let yesterday = String::from_utf8(date.stdout).expect("UTF-8").trim().to_string();
    let log = dir.join("sessions.jsonl");
    let lines = [
        record("close", "192.0.2.7", &format!("{yesterday}T00:00:00.000Z"), 11, 22),
        record("close", "192.0.2.7", &format!("{yesterday}T23:59:59.999Z"), 1, 2),
    ];
    std::fs::write(&log, lines.join("\n") + "\n").expect("write the log");
    let out = dir.join("reports");
    std::fs::create_dir(&out).expect("mkdir");
    let args = ["--previous-day", "--out-dir", out.to_str().expect("UTF-8")];
    assert_eq!(stdout_of(&args, &log), "");
    let csv = std::fs::read_to_string(out.join(format!("sluice-report-{yesterday}.csv")))
        .expect("yesterday's file");
    let next = Command::new("date")
        .args(["-u", "-d", &format!("{yesterday} + 1 day"), "+%F"])
        .output()
        .expect("date");
    let today = String::from_utf8(next.stdout).expect("UTF-8").trim().to_string();
    let span = format!("{yesterday}T00:00:00Z,{today}T00:00:00Z");
    assert_eq!(
        csv,
        format!(
            "bucket_start,bucket_end,scope,key,sessions,denials,bytes_up,bytes_down\n\
             {span},total,,2,0,12,24\n{span},network,192.0.2.0/24,2,0,12,24\n\
             {span},client,192.0.2.7,2,0,12,24\n"
        )
    );
}

#[test]
fn bad_ranges_and_options_are_usage_errors() {
    let dir = ScratchDir::new();
    let log = write_log(&dir);
    for args in [
        &["--since", "2026-11-22T10:00:00Z", "--until", "2026-11-22T10:00:00Z"][..],
        &["--since", "yesterday"],
        &["--out-dir", "/tmp"],
        &["--day", "2026-11-31"],
        &["--previous-day", "--since", "2026-11-22"],
        &["--by", "fortnight"],
        &["--network-v4", "33"],
    ] {
        let out = report(args, &log);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
}
