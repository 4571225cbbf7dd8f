//! `${NAME}` expansion from app settings: the start of the second pass. Messages name the
//! field and the setting, never the setting's value.

use super::validate::Validator;

/// Prefix of an app setting that the platform failed to resolve from Key Vault.
const KEY_VAULT_REFERENCE_PREFIX: &str = "@Microsoft.KeyVault(";

impl Validator<'_> {
    /// Replaces every `${NAME}` in `value` with the app setting `NAME`.
    pub(super) fn expand(&mut self, field: &str, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        let mut ok = true;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.problems
                    .push(format!("{field}: unterminated ${{ in value"));
                return None;
            };
            let name = &after[..end];
            if !is_valid_setting_name(name) {
                self.problems.push(format!(
                    "{field}: ${{{name}}} is not a valid app setting name"
                ));
                ok = false;
            } else if let Some(setting) = self.setting(field, name) {
                out.push_str(&setting);
            } else {
                ok = false;
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    /// Reads one app setting, refusing unset ones and unresolved Key Vault references.
    pub(super) fn setting(&mut self, field: &str, name: &str) -> Option<String> {
        match self.env.var(name) {
            None => {
                self.problems
                    .push(format!("{field}: app setting {name} is not set"));
                None
            }
            Some(value) if value.trim_start().starts_with(KEY_VAULT_REFERENCE_PREFIX) => {
                self.problems.push(format!(
                    "{field}: app setting {name} still holds an unresolved @Microsoft.KeyVault(...) reference; check the app's identity has access to that secret"
                ));
                None
            }
            Some(value) => Some(value),
        }
    }
}

fn is_valid_setting_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}
