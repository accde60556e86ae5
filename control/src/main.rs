//! The `sluice` binary: its command line. Configuration, signals, the control thread and
//! everything else live in the library (`lib.rs`); the data plane lives in `sluice-engine`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::FromArgMatches;
use log::LevelFilter;

use sluice::cli::{self, Cli, Command, CtlCommand};
use sluice::config::{self, Config};
use sluice::instance::{self, Paths};
use sluice::upgrade::{Handover, DEFAULT_UPGRADE_TIMEOUT};
use sluice::{ctl, demo, logger, report, run};

fn main() -> ExitCode {
    let matches = cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Run { config, log_level, handover } => run_command(config, log_level, handover),
        Command::Upgrade { config } => {
            let loaded = config.as_ref().map(|p| Config::load(p));
            let pid_file = match &loaded {
                Some(Ok(c)) => c.process.pid_file.clone(),
                _ => None,
            };
            let paths = Paths::for_config(config.as_deref(), pid_file.as_deref());
            // The answer comes once the new process accepts, or the attempt failed.
            match instance::request_upgrade(&paths, DEFAULT_UPGRADE_TIMEOUT * 2) {
                Ok(message) => {
                    println!("sluice upgrade: {message}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("sluice upgrade: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            cli::completions(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpage => match cli::manpage(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice manpage: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ctl { admin, config, token_file, command } => {
            let options = ctl::Options { admin, config, token_file };
            let outcome = ctl_action(command)
                .and_then(|action| Ok((ctl::Target::resolve(&options)?, action)))
                .and_then(|(target, action)| ctl::run(&target, action));
            match outcome {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("sluice ctl: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                for warning in &c.warnings {
                    eprintln!("{warning}");
                }
                println!(
                    "{}: ok ({} services; defaults: {})",
                    c.source,
                    c.services.len(),
                    config::defaults_summary()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Report(args) => report_command(args),
        Command::Demo => {
            logger::init(LevelFilter::Warn);
            let loaded = Config::load_or_default(None).expect("the embedded default is valid");
            match demo::demo(loaded) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("sluice demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn ctl_action(command: CtlCommand) -> Result<ctl::Action, String> {
    Ok(match command {
        CtlCommand::Status => ctl::Action::Status,
        CtlCommand::Connections { service, client, limit } => {
            ctl::Action::Connections { service, client, limit }
        }
        CtlCommand::Kill { id } => ctl::Action::Kill { id },
        CtlCommand::Drain { service, addr } => {
            ctl::Action::Backend { action: "drain", service, addr }
        }
        CtlCommand::Disable { service, addr } => {
            ctl::Action::Backend { action: "disable", service, addr }
        }
        CtlCommand::Enable { service, addr } => {
            ctl::Action::Backend { action: "enable", service, addr }
        }
        CtlCommand::Reload => ctl::Action::Reload,
        CtlCommand::Top { interval, iterations } => {
            if !(0.1..=3600.0).contains(&interval) {
                return Err(format!("--interval {interval} is not from 0.1 to 3600 seconds"));
            }
            ctl::Action::Top { interval: std::time::Duration::from_secs_f64(interval), iterations }
        }
    })
}

/// `sluice run`, started by hand or, with `handover`, by a predecessor upgrading: then a
/// configuration that does not load is reported back to it (it goes on serving).
fn run_command(config: Option<PathBuf>, log_level: LevelFilter, handover: bool) -> ExitCode {
    logger::init(log_level);
    let handover = match handover.then(Handover::receive) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match Config::load_or_default(config.as_ref()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            if let Some(h) = &handover {
                h.fail(&format!("its configuration is invalid:\n{errors}"));
            }
            return ExitCode::from(2);
        }
    };
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    match run::run(config, loaded, handover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `sluice report`: prints the report, or writes it into `--out-dir` for a day. Exit 0, 1 on
/// an unreadable log or an unwritable file, 2 on a usage error.
fn report_command(args: cli::ReportArgs) -> ExitCode {
    use sluice::cli::ReportFormat;
    use sluice::report::range::{self, By};
    let fail = |message: String, code: u8| {
        eprintln!("sluice report: {message}");
        ExitCode::from(code)
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let day = match (&args.day, args.previous_day) {
        (Some(text), _) => match range::day(text) {
            Ok(d) => Some(d),
            Err(e) => return fail(e, 2),
        },
        (None, true) => Some(range::previous_day(now)),
        (None, false) => None,
    };
    if args.out_dir.is_some() && day.is_none() {
        return fail("--out-dir needs --previous-day or --day".into(), 2);
    }
    let (since, until) = match day {
        Some((s, u)) => (Some(s), Some(u)),
        None => (args.since, args.until),
    };
    if let (Some(s), Some(u)) = (since, until) {
        if s >= u {
            return fail("--since must be before --until".into(), 2);
        }
    }
    let format = match (args.format, args.json, &args.out_dir) {
        (Some(f), _, _) => f,
        (None, true, _) => ReportFormat::Json,
        (None, false, Some(_)) => ReportFormat::Csv,
        (None, false, None) => ReportFormat::Text,
    };
    let needs_buckets = format == ReportFormat::Csv || args.out_dir.is_some();
    let options = report::Options {
        since,
        until,
        by: args.by.or(needs_buckets.then_some(By::Day)),
        network_v4: args.network_v4,
        network_v6: args.network_v6,
    };
    let r = match report::Report::from_files_with(&args.files, options) {
        Ok(r) => r,
        Err(e) => return fail(e, 1),
    };
    let text = match format {
        ReportFormat::Json => serde_json::to_string_pretty(&r.to_json()).unwrap_or_default() + "\n",
        ReportFormat::Csv => r.to_csv(),
        ReportFormat::Text => r.to_text(),
    };
    if let Some(path) = &args.html {
        if let Err(e) = std::fs::write(path, r.to_html()) {
            return fail(format!("cannot write {}: {e}", path.display()), 1);
        }
    }
    match (&args.out_dir, day) {
        (Some(dir), Some((start, _))) => {
            let name =
                format!("sluice-report-{}.{}", range::format_date(start), format.extension());
            let path = dir.join(name);
            if let Err(e) = report::write_atomically(&path, text.as_bytes()) {
                return fail(format!("cannot write {}: {e}", path.display()), 1);
            }
        }
        _ => print!("{text}"),
    }
    ExitCode::SUCCESS
}
