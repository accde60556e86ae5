//! `[engine]` keys for the process itself, which the engine never sees: `user` and `group`
//! (whom to become once every listener is bound), `max_open_files` and `pid_file`.

use super::{Names, Validator};
use crate::config::defaults::{MAX_OPEN_FILES, MIN_OPEN_FILES};
use crate::config::schema::EngineSection;
use crate::config::spec::ProcessSpec;

impl Validator<'_> {
    /// `engine.user`, `group`, `max_open_files` and `pid_file`.
    pub(super) fn process(&mut self, raw: &EngineSection) -> ProcessSpec {
        let mut process = ProcessSpec::default();
        if let Some(n) = &raw.max_open_files {
            match *n.get_ref() {
                v @ MIN_OPEN_FILES..=MAX_OPEN_FILES => process.max_open_files = Some(v as u64),
                _ => self.error(
                    n.span(),
                    "engine.max_open_files",
                    format!("expected a number of fds from {MIN_OPEN_FILES} to {MAX_OPEN_FILES}"),
                ),
            }
        }
        if let Some(p) = &raw.pid_file {
            if p.get_ref().trim().is_empty() || !p.get_ref().starts_with('/') {
                self.error(p.span(), "engine.pid_file", "must be an absolute path");
            } else {
                process.pid_file = Some(std::path::PathBuf::from(p.get_ref()));
            }
        }
        match (&raw.user, &raw.group) {
            (None, Some(g)) => {
                self.error(g.span(), "engine.group", "a group needs a user (engine.user)");
            }
            (Some(u), group) => {
                let name = u.get_ref().trim();
                let group_name = group.as_ref().map(|g| g.get_ref().trim());
                if name.is_empty() {
                    self.error(u.span(), "engine.user", "must name a user");
                } else if self.names == Names::Resolve {
                    match crate::privileges::resolve(name, group_name) {
                        Ok(who) => process.run_as = Some(who),
                        Err(message) => {
                            let key = match message.contains("group") {
                                true => "engine.group",
                                false => "engine.user",
                            };
                            let span = match (key, group) {
                                ("engine.group", Some(g)) => g.span(),
                                _ => u.span(),
                            };
                            self.error(span, key, message);
                        }
                    }
                }
            }
            (None, None) => {}
        }
        process
    }
}
