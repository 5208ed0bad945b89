//! [`ConfigError`]: a refused fleet file, naming file, key and line; and the translation of
//! serde_yaml's errors into it.

use std::fmt;
use std::path::{Path, PathBuf};

use super::locate_key;

/// A refused fleet file: where, which key, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The file, when the text came from one.
    pub file: Option<PathBuf>,
    /// Dotted key path (`workers.count`), when known.
    pub key: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().map(Path::display);
        match (file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Keys whose entries are parsed while deserializing ([`super::IpNetwork`]): serde_yaml puts
/// a refused entry where the list starts, but like a range check it is reported at the
/// key's own line.
const REPORTED_AT_KEY: &[&str] = &["balancer.trusted_proxies"];

/// Turn serde_yaml's error into ours; its message already carries the key path.
pub(super) fn from_serde(text: &str, e: serde_yaml::Error) -> ConfigError {
    let line = e.location().map(|l| l.line());
    let full = e.to_string();
    // serde_yaml prints "path.to.key: message at line L column C"; split the path off.
    let without_loc = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full.clone(),
    };
    let (key, message) = match without_loc.split_once(": ") {
        Some((k, m)) if !k.contains(' ') && !k.is_empty() => (Some(k.to_owned()), m.to_owned()),
        _ => (None, without_loc),
    };
    // An unknown key is reported at its own line; name it in the key too.
    let key = match (key, unknown_field(&message)) {
        (Some(parent), Some(field)) => Some(format!("{parent}.{field}")),
        (None, Some(field)) => Some(field.to_owned()),
        (key, None) => key,
    };
    let locate = || key.as_deref().and_then(|k| locate_key(text, k));
    let line = match key.as_deref() {
        Some(k) if REPORTED_AT_KEY.contains(&k) => locate().or(line),
        _ => line.or_else(locate),
    };
    ConfigError {
        file: None,
        key,
        line,
        message,
    }
}

fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::super::{FleetConfig, GOOD};

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = GOOD.replace("  host:", "  hots:");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.hots"), "{err}");
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn unknown_top_level_key() {
        let err = FleetConfig::from_yaml_str("listen: 0.0.0.0:1\nworkerz: {}\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workerz"), "{err}");
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let text = GOOD.replace("count: 4", "count: four");
        let err = FleetConfig::from_yaml_str(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("workers.count"), "{err}");
        assert_eq!(err.line, Some(6));
    }

    #[test]
    fn bad_listen_address() {
        let err = FleetConfig::from_yaml_str("listen: nowhere\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("listen"), "{err}");
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn bad_trusted_proxy_is_reported_at_the_key() {
        // Flow and block lists alike: the key, its line, the entry quoted.
        for text in [
            "balancer:\n  trusted_proxies: [10.0.0.0/8, 10.0.0.0/40]\n",
            "balancer:\n  trusted_proxies:\n    - 10.0.0.0/8\n    - 10.0.0.0/40\n",
        ] {
            let err = FleetConfig::from_yaml_str(text).unwrap_err();
            assert_eq!(
                err.key.as_deref(),
                Some("balancer.trusted_proxies"),
                "{err}"
            );
            assert_eq!(err.line, Some(2), "{err}");
            assert_eq!(err.message, r#""10.0.0.0/40" has a bad prefix length"#);
        }
        let err = FleetConfig::from_yaml_str("balancer: {trusted_proxies: [proxy]}\n").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("balancer.trusted_proxies"),
            "{err}"
        );
        assert_eq!(err.line, Some(1), "{err}");
        assert_eq!(err.message, r#""proxy" is not an IP or CIDR"#);
    }

    #[test]
    fn display_has_file_line_key() {
        let dir = std::env::temp_dir().join(format!("fleet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("fleet.yaml");
        std::fs::write(&file, GOOD.replace("count: 4", "count: 0")).unwrap();
        let msg = FleetConfig::load(&file).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}:6: key `workers.count`", file.display())),
            "{msg}"
        );
    }
}
