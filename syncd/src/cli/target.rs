//! The `WORKSPACE[@VERSION]` argument.

use std::fmt;
use std::str::FromStr;

use podfs_protocol::VersionRef;
use podfs_protocol::api::valid_workspace_name;

/// A workspace and a version in it, written `demo`, `demo@12` or `demo@head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub workspace: String,
    pub version: VersionRef,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("invalid workspace name {0:?}: use 1-128 of A-Z a-z 0-9 . _ - (not starting with `.`)")]
    Workspace(String),
    #[error("invalid version {0:?} in WORKSPACE@VERSION: expected a version number or `head`")]
    Version(String),
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ws, version) = match s.split_once('@') {
            None => (s, VersionRef::Head),
            Some((ws, v)) => (ws, v.parse().map_err(|_| TargetError::Version(v.to_string()))?),
        };
        if !valid_workspace_name(ws) {
            return Err(TargetError::Workspace(ws.to_string()));
        }
        Ok(Target { workspace: ws.to_string(), version })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.workspace, self.version)
    }
}

/// A bare workspace name (no `@VERSION`), for clap.
pub fn parse_workspace(s: &str) -> Result<String, TargetError> {
    if valid_workspace_name(s) { Ok(s.to_string()) } else { Err(TargetError::Workspace(s.to_string())) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn t(s: &str) -> Result<Target, TargetError> {
        s.parse()
    }

    #[test]
    fn parses_forms() {
        assert_eq!(t("demo").unwrap(), Target { workspace: "demo".into(), version: VersionRef::Head });
        assert_eq!(t("demo@head").unwrap().version, VersionRef::Head);
        assert_eq!(t("my.ws-1@12").unwrap(), Target { workspace: "my.ws-1".into(), version: VersionRef::Number(12) });
        assert_eq!(t("demo@0").unwrap().version, VersionRef::Number(0));
    }

    #[test]
    fn refuses_junk() {
        for bad in ["", "@3", "demo@", "demo@x", "demo@-1", "demo@01", "demo@3@4", "a/b", ".hidden", "demo@HEAD"] {
            assert!(t(bad).is_err(), "{bad}");
        }
        assert!(matches!(t("demo@x"), Err(TargetError::Version(_))));
        assert!(matches!(t("a b@3"), Err(TargetError::Workspace(_))));
        assert!(parse_workspace("demo@3").is_err());
        assert_eq!(parse_workspace("demo").unwrap(), "demo");
    }

    proptest! {
        #[test]
        fn display_round_trips(ws in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}", v in proptest::option::of(0u64..=i64::MAX as u64)) {
            let version = v.map_or(VersionRef::Head, VersionRef::Number);
            let target = Target { workspace: ws, version };
            prop_assert_eq!(target.to_string().parse::<Target>().unwrap(), target);
        }
    }
}
