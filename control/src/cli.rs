//! The command line, defined once: `main.rs` parses it, and the shell completions and the
//! man page are generated from the same definition, so neither can fall out of date.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use log::LevelFilter;

use crate::report::range::By;

/// A thread-per-core Layer-4 forwarding engine: TCP relay with io_uring and splice.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the forwarding engine (on the embedded default config without --config).
    Run {
        /// Configuration file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Log level: error, warn, info (one line per session), debug.
        #[arg(long, default_value = "info", value_parser = parse_level)]
        log_level: LevelFilter,
        /// Started by `sluice upgrade`: standard input carries the listening sockets.
        #[arg(long, hide = true)]
        handover: bool,
    },
    /// Validate a configuration file: exit 0 if valid, 2 with every error otherwise.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Replace the running sluice by the binary now installed at its path, without dropping
    /// a connection (as SIGUSR2 does); exit 0 once the new process accepts.
    Upgrade {
        /// The configuration file the running sluice was started with.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Show sluice working: the embedded default with a local echo server and clients.
    Demo,
    /// Aggregate JSON-lines connection logs (plain or gzip'd) into a report.
    Report(ReportArgs),
    /// Talk to a running sluice through its admin API.
    Ctl {
        /// The admin API: ip:port or unix:/path (default: $SLUICE_ADMIN, the --config
        /// file's [admin] listen, or 127.0.0.1:9900).
        #[arg(long, global = true)]
        admin: Option<String>,
        /// Take the admin address and token file from this config file's [admin] section.
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        /// The admin token file (read and write tokens), or a file holding one token
        /// (default: $SLUICE_TOKEN).
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page (roff).
    Manpage,
}

/// `sluice report`: what to read, which sessions to count, how to group and print them.
/// Times are UTC; a session counts in the range and bucket of its start.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Log files written by a `[[log]]` sink with format "json".
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print the report as JSON (same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Output format: text (default), json, or csv (the per-bucket accounting tables).
    #[arg(long, value_enum)]
    pub format: Option<ReportFormat>,
    /// Also write an HTML page with charts to this file.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Only sessions that started at or after this time: 2026-11-22 (midnight UTC) or
    /// RFC 3339 (2026-11-22T08:00:00Z, 2026-11-22T09:00:00+01:00).
    #[arg(long, value_parser = parse_report_time)]
    pub since: Option<i64>,
    /// Only sessions that started before this time (exclusive); same forms as --since.
    #[arg(long, value_parser = parse_report_time)]
    pub until: Option<i64>,
    /// Accounting tables (total, client networks, clients) per minute, hour, day or week
    /// (ISO weeks from Monday); csv and --out-dir default to day.
    #[arg(long, value_enum)]
    pub by: Option<By>,
    /// Only the UTC day before today (for cron or a systemd timer).
    #[arg(long, conflicts_with_all = ["since", "until", "day"])]
    pub previous_day: bool,
    /// Only this UTC day (2026-11-22).
    #[arg(long, conflicts_with_all = ["since", "until"])]
    pub day: Option<String>,
    /// Write the report of --previous-day or --day into this directory as
    /// sluice-report-DATE.csv (or .json, .txt), atomically, instead of printing it.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Prefix length grouping IPv4 clients into networks.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub network_v4: u8,
    /// Prefix length grouping IPv6 clients into networks.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub network_v6: u8,
}

/// How `sluice report` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Csv,
}

impl ReportFormat {
    /// The extension of a report file in this format.
    pub fn extension(self) -> &'static str {
        match self {
            ReportFormat::Text => "txt",
            ReportFormat::Json => "json",
            ReportFormat::Csv => "csv",
        }
    }
}

fn parse_report_time(text: &str) -> Result<i64, String> {
    crate::report::range::parse_time(text)
}

/// What `sluice ctl` does.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Services, backends and workers.
    Status,
    /// Live sessions, longest-lived first.
    Connections {
        /// Only this service's sessions.
        #[arg(long)]
        service: Option<String>,
        /// Only clients in this network (10.0.0.0/8) or with this address.
        #[arg(long)]
        client: Option<String>,
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Cut a live session (abortively; logged with reason admin_kill).
    Kill {
        /// The session's id, as `connections` shows it.
        id: String,
    },
    /// Send no new session to a backend; its sessions finish.
    Drain { service: String, addr: String },
    /// Take a backend out (maintenance): no new session; its sessions finish.
    Disable { service: String, addr: String },
    /// Give a backend new sessions again.
    Enable { service: String, addr: String },
    /// Re-read the configuration file; prints the errors and exits 1 when it is refused.
    Reload,
    /// A live view, redrawn every second; q quits.
    Top {
        /// Seconds between redraws.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many redraws (default: until q).
        #[arg(long)]
        iterations: Option<u64>,
    },
}

/// Shells `sluice completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not one of off, error, warn, info, debug, trace"))
}

/// The clap command with the long version (`--version`) filled in.
pub fn command() -> clap::Command {
    let long: &'static str = Box::leak(long_version().into_boxed_str());
    Cli::command().long_version(long)
}

/// `sluice --version`: the version, the git revision, build profile and target, and what
/// this kernel offers io_uring.
pub fn long_version() -> String {
    let uring = match sluice_engine::select_driver(sluice_engine::DriverChoice::Auto) {
        Ok(s) if s.kind == sluice_engine::DriverKind::Uring => format!("available ({})", s.detail),
        Ok(s) => format!("not available: {}", s.detail.trim_start_matches("reason=")),
        Err(e) => format!("not available: {e}"),
    };
    format!(
        "{}\nrevision: {}\nprofile: {}\ntarget: {}\nio_uring on this kernel: {uring}",
        env!("CARGO_PKG_VERSION"),
        env!("SLUICE_REVISION"),
        env!("SLUICE_PROFILE"),
        env!("SLUICE_TARGET"),
    )
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, out: &mut dyn std::io::Write) {
    let mut cmd = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "sluice", out);
}

/// Writes the man page to `out`.
pub fn manpage(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_man_page_names_every_visible_subcommand() {
        let mut out = Vec::new();
        manpage(&mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.starts_with(".ie"), "roff: {}", &page[..40.min(page.len())]);
        for sub in Cli::command().get_subcommands().filter(|s| !s.is_hide_set()) {
            assert!(page.contains(sub.get_name()), "no {} in the man page", sub.get_name());
        }
        assert!(!page.contains("handover"), "a hidden flag is not documented");
    }

    #[test]
    fn each_shell_gets_completions_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            for sub in ["run", "check", "upgrade", "report"] {
                assert!(script.contains(sub), "{shell:?} completions lack {sub}");
            }
        }
    }
}
