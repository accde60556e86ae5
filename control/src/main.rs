//! The `sluice` binary: its command line. Configuration, signals, the control thread and
//! everything else live in the library (`lib.rs`); the data plane lives in `sluice-engine`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use log::LevelFilter;

use sluice::config::{self, Config};
use sluice::{demo, logger, report, run};

/// A thread-per-core Layer-4 forwarding engine: TCP relay with io_uring and splice.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the forwarding engine (on the embedded default config without --config).
    Run {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Log level: error, warn, info (one line per session), debug.
        #[arg(long, default_value = "info", value_parser = parse_level)]
        log_level: LevelFilter,
    },
    /// Validate a configuration file: exit 0 if valid, 2 with every error otherwise.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show sluice working: the embedded default with a local echo server and clients.
    Demo,
    /// Aggregate JSON-lines connection logs (plain or gzip'd) into a report.
    Report {
        /// Log files written by a `[[log]]` sink with format "json".
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also write an HTML page with charts to this file.
        #[arg(long)]
        html: Option<PathBuf>,
    },
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not one of off, error, warn, info, debug, trace"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_level } => {
            logger::init(log_level);
            let loaded = match Config::load_or_default(config.as_ref()) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            match run::run(config, loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
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
        Command::Report { files, json, html } => match report::Report::from_files(&files) {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&r.to_json()).unwrap_or_default());
                } else {
                    print!("{}", r.to_text());
                }
                if let Some(path) = html {
                    if let Err(e) = std::fs::write(&path, r.to_html()) {
                        eprintln!("sluice report: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice report: {e}");
                ExitCode::FAILURE
            }
        },
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
