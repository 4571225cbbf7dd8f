//! From what a validated token (or Easy Auth principal) says to the [`Caller`] that
//! `allowed_callers` is matched against.
//!
//! A client id names an application, and Entra writes it (`azp`, `appid`) into every token
//! issued through that application: the application's own app-only tokens, and the tokens
//! users get by signing in through it (delegated: `scp` and the user's `oid`). Listing API
//! Management's client id means "API Management itself", so the client id names the caller
//! only in app-only tokens; otherwise every user who can sign in through that client would be
//! admitted. An object id names one principal (the application's service principal, or the
//! user) and names the caller whatever the token.

use super::caller::Caller;

/// The identifying claims of a token or principal that has already been validated.
pub(super) struct Claimed {
    /// `oid`: the caller's service principal, or the signed-in user.
    pub object_id: Option<String>,
    /// `azp`, `appid` or `client_id`: the application the token was issued through.
    pub client_id: Option<String>,
    /// `sub`, used only when neither id is there (issuers other than Entra).
    pub subject: Option<String>,
    pub roles: Vec<String>,
    /// Whether the client acts for a user (see [`delegated`]): then its client id does not
    /// name the caller.
    pub delegated: bool,
}

/// Whether a token was issued to a client acting for a user: it carries delegated scopes
/// (`scp`), or `idtyp` (an optional claim; absent unless configured) says anything but `app`.
pub(super) fn delegated(has_scp: bool, identity_type: Option<&str>) -> bool {
    has_scp || identity_type.is_some_and(|kind| !kind.eq_ignore_ascii_case("app"))
}

impl Claimed {
    /// The caller these claims name: its object id, then (app-only tokens only) its client
    /// id, else its subject; `None` when nothing names it.
    pub(super) fn caller(self) -> Option<Caller> {
        let client_id = self.client_id.filter(|_| !self.delegated);
        let mut ids: Vec<String> = self.object_id.into_iter().chain(client_id).collect();
        if ids.is_empty() {
            ids.extend(self.subject);
        }
        ids.dedup();
        Some(Caller {
            id: Some(ids.first()?.clone()),
            ids,
            roles: self.roles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimed(
        object_id: Option<&str>,
        client_id: Option<&str>,
        subject: Option<&str>,
        delegated: bool,
    ) -> Claimed {
        Claimed {
            object_id: object_id.map(str::to_string),
            client_id: client_id.map(str::to_string),
            subject: subject.map(str::to_string),
            roles: vec![],
            delegated,
        }
    }

    #[test]
    fn the_subject_names_the_caller_only_when_no_object_or_client_id_does() {
        let entra = claimed(Some("oid"), Some("azp"), Some("sub"), false)
            .caller()
            .unwrap();
        assert_eq!(entra.ids, ["oid", "azp"]);
        assert_eq!(entra.audit_name(), "oid");
        let other = claimed(None, None, Some("sub"), false).caller().unwrap();
        assert_eq!(other.ids, ["sub"]);
        assert!(claimed(None, None, None, false).caller().is_none());
    }

    #[test]
    fn a_delegated_token_is_named_by_the_user_not_by_the_client_it_came_through() {
        let user = claimed(
            Some("user-oid"),
            Some("apim-client"),
            Some("pairwise"),
            true,
        )
        .caller()
        .unwrap();
        assert_eq!(user.ids, ["user-oid"]);
        assert_eq!(user.audit_name(), "user-oid");
        // Without an object id, the subject (the user at other issuers) names it.
        let user = claimed(None, Some("apim-client"), Some("user"), true)
            .caller()
            .unwrap();
        assert_eq!(user.ids, ["user"]);
    }

    #[test]
    fn scp_or_an_idtyp_other_than_app_make_a_token_delegated() {
        assert!(!delegated(false, None));
        assert!(!delegated(false, Some("app")));
        assert!(!delegated(false, Some("App")));
        assert!(delegated(true, None));
        assert!(delegated(true, Some("app")));
        assert!(delegated(false, Some("user")));
        assert!(delegated(false, Some("device")));
    }
}
