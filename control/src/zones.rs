//! Time zones for firewall time windows, read from the machine's tz database. The engine
//! only converts instants with the zone data it is given; reading files happens here.

use std::path::Path;

use sluice_engine::acl::Zone;

/// Where named zones are looked up.
pub const DEFAULT_ZONEINFO_DIR: &str = "/usr/share/zoneinfo";
/// The machine's local zone when `TZ` is unset.
pub const DEFAULT_LOCALTIME_PATH: &str = "/etc/localtime";

/// A zone of the tz database by name (`"Europe/Paris"`); `"UTC"` and `"Etc/UTC"` need no
/// file; `"local"` is the process's local zone.
pub fn named(name: &str) -> Result<Zone, String> {
    match name {
        "UTC" | "Etc/UTC" => return Ok(Zone::utc()),
        "local" => return local(),
        _ => {}
    }
    let valid = |b: u8| b.is_ascii_alphanumeric() || b"/_+-".contains(&b);
    if name.is_empty() || name.starts_with('/') || name.contains("..") || !name.bytes().all(valid) {
        return Err(format!("invalid time zone name {name:?}"));
    }
    let path = format!("{DEFAULT_ZONEINFO_DIR}/{name}");
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("unknown time zone {name:?}: no file {path} (is tzdata installed?)")
        }
        _ => format!("time zone {name:?}: cannot read {path}: {e}"),
    })?;
    Zone::from_tzif(name, &bytes)
}

/// The process's local zone: the zone named by `TZ` if set (set but empty is UTC), else
/// [`DEFAULT_LOCALTIME_PATH`]; UTC when that file does not exist.
pub fn local() -> Result<Zone, String> {
    match std::env::var("TZ") {
        Ok(tz) if tz.is_empty() => Ok(Zone::utc()),
        Ok(tz) => named(tz.trim_start_matches(':')),
        Err(_) => from_localtime(Path::new(DEFAULT_LOCALTIME_PATH)),
    }
}

fn from_localtime(path: &Path) -> Result<Zone, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Zone::utc()),
        Err(e) => return Err(format!("local time zone: cannot read {}: {e}", path.display())),
    };
    let target = std::fs::read_link(path).ok();
    let name = target
        .as_ref()
        .and_then(|t| t.to_str())
        .and_then(|t| t.split_once("zoneinfo/").map(|(_, name)| name.to_string()))
        .unwrap_or_else(|| "localtime".into());
    Zone::from_tzif(&name, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_file_is_read() {
        assert_eq!(named("UTC").unwrap().name(), "UTC");
        let err = named("Nowhere/Atlantis").unwrap_err();
        assert!(err.contains("unknown time zone"), "{err}");
        assert!(named("../etc/passwd").unwrap_err().contains("invalid"));
        assert!(named("/etc/localtime").unwrap_err().contains("invalid"));
    }

    #[test]
    fn installed_zones_load() {
        match named("Europe/Paris") {
            Ok(z) => assert_eq!(z.name(), "Europe/Paris"),
            Err(e) => sluice_tests::skip(&format!("{e} (Debian package tzdata)")),
        }
    }
}
