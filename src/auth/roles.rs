//! Roles per instance, following seed 003's access levels; each includes the ones
//! before it.

use std::collections::BTreeMap;
use std::fmt;

/// In the tokens file only: a role on `*` holds in every instance. Never a valid
/// instance id in a request.
pub const WILDCARD_INSTANCE: &str = "*";
/// Longest instance id.
pub const MAX_INSTANCE_LEN: usize = 128;

/// An instance id as a request may name it: 1..128 printable ASCII characters, no
/// spaces, and not `*`.
pub fn valid_instance_id(instance: &str) -> bool {
    instance != WILDCARD_INSTANCE
        && !instance.is_empty()
        && instance.len() <= MAX_INSTANCE_LEN
        && instance.bytes().all(|b| b.is_ascii_graphic())
}

/// An instance a role may be granted on: an instance id, or `*`.
pub fn valid_grant_instance(instance: &str) -> bool {
    instance == WILDCARD_INSTANCE || valid_instance_id(instance)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// WrapKey, UnwrapKey, RewrapKey.
    Viewer,
    /// + creating, reading, listing and counting keys, import tokens and imports.
    Editor,
    /// + rotation, state changes, deletion, and reading the audit trail.
    Administrator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Editor, Role::Administrator];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "Viewer",
            Role::Editor => "Editor",
            Role::Administrator => "Administrator",
        }
    }

    /// Case-insensitive: `viewer`, `Viewer` and `VIEWER` are one role.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A principal's roles: instance id (or `*`) -> role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants(pub BTreeMap<String, Role>);

impl Grants {
    /// The strongest role the principal holds in `instance`, counting `*`. `instance`
    /// must be a real instance id: the caller refuses `*` in requests before this.
    pub fn role_in(&self, instance: &str) -> Option<Role> {
        let direct = self.0.get(instance).copied();
        let everywhere = self.0.get(WILDCARD_INSTANCE).copied();
        direct.max(everywhere)
    }

    /// True when the principal holds at least `role` in every instance.
    pub fn everywhere_at_least(&self, role: Role) -> bool {
        self.0.get(WILDCARD_INSTANCE).is_some_and(|r| *r >= role)
    }

    /// `instance=Role, ...` for listings.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(instance, role)| format!("{instance}={role}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(pairs: &[(&str, Role)]) -> Grants {
        Grants(pairs.iter().map(|(i, r)| (i.to_string(), *r)).collect())
    }

    #[test]
    fn each_role_includes_the_ones_before() {
        assert!(Role::Viewer < Role::Editor && Role::Editor < Role::Administrator);
    }

    #[test]
    fn the_wildcard_holds_everywhere_and_the_stronger_grant_wins() {
        let g = grants(&[("a", Role::Administrator), ("*", Role::Viewer)]);
        assert_eq!(g.role_in("a"), Some(Role::Administrator));
        assert_eq!(g.role_in("b"), Some(Role::Viewer));
        let g = grants(&[("a", Role::Viewer)]);
        assert_eq!(g.role_in("b"), None);
        assert!(!g.everywhere_at_least(Role::Viewer));
    }

    #[test]
    fn roles_parse_case_insensitively() {
        assert_eq!(Role::parse("editor"), Some(Role::Editor));
        assert_eq!(Role::parse("ADMINISTRATOR"), Some(Role::Administrator));
        assert_eq!(Role::parse("root"), None);
    }
}
