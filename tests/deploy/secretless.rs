//! The secretless deployment: the signing key Bicep creates, and the broker's identity signing
//! with exactly that key (and the listed certificates' keys), never more.

use crate::bicep::{param, resources_of};

const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";

#[test]
fn the_signing_key_is_rsa_2048_or_ec_p256_sign_only_and_optionally_in_an_hsm() {
    let keys: Vec<_> = resources_of("Microsoft.KeyVault/vaults/keys")
        .into_iter()
        .filter(|key| !key.is_existing())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:#?}");
    let key = &keys[0];
    assert_eq!(
        key.property("keySize").as_deref(),
        Some("keyType == 'RSA' ? 2048 : null")
    );
    assert_eq!(
        key.property("curveName").as_deref(),
        Some("keyType == 'EC' ? 'P-256' : null")
    );
    assert_eq!(
        key.property("keyOps").as_deref(),
        Some("['sign', 'verify']")
    );
    assert_eq!(key.property("exportable").as_deref(), Some("false"));
    assert_eq!(
        key.property("kty").as_deref(),
        Some("hsm ? '${keyType}-HSM' : keyType")
    );
    assert!(param("infra/main.bicep", "signingKeyType").contains("@allowed(['RSA', 'EC'])"));
    // HSM keys need the Premium vault: the switch must reach the vault's SKU.
    let vault = resources_of("Microsoft.KeyVault/vaults")
        .into_iter()
        .find(|vault| !vault.is_existing())
        .unwrap();
    assert!(
        vault.body.contains("premium ? 'premium' : 'standard'"),
        "{}",
        vault.body
    );
    assert!(crate::read("infra/main.bicep").contains("premium: signingKeyHsm"));
}

#[test]
fn the_broker_signs_only_with_the_keys_it_is_given_crypto_user_on() {
    let grants: Vec<_> = resources_of("Microsoft.Authorization/roleAssignments")
        .into_iter()
        .filter(|grant| grant.body.contains("keyVaultCryptoUser"))
        .collect();
    assert_eq!(
        grants.len(),
        3,
        "the created key, the signing certificates' keys and the TLS certificates' keys: {grants:#?}"
    );
    for grant in &grants {
        let scope = grant.property("scope").unwrap();
        assert!(
            [
                "signingKey",
                "certificateKeys[i]",
                "clientCertificateKeys[i]"
            ]
            .contains(&scope.as_str()),
            "scoped to a key, never the vault: {}",
            grant.describe()
        );
    }
    let module = crate::read("infra/modules/signing-access.bicep");
    assert!(module.contains(&format!("var keyVaultCryptoUser = '{CRYPTO_USER}'")));
}

#[test]
fn a_tls_client_certificate_grants_its_key_to_sign_or_its_secret_to_read_never_both() {
    let module = crate::read("infra/modules/client-certificate-access.bicep");
    assert!(module.contains(&format!("var keyVaultCryptoUser = '{CRYPTO_USER}'")));
    let grants: Vec<_> = resources_of("Microsoft.Authorization/roleAssignments")
        .into_iter()
        .filter(|grant| grant.describe().contains("clientCertificate"))
        .collect();
    let scopes: Vec<(String, bool, bool)> = grants
        .iter()
        .map(|grant| {
            (
                grant.property("scope").unwrap(),
                grant.body.contains("keyVaultCryptoUser"),
                grant.body.contains("keyVaultSecretsUser"),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        vec![
            ("clientCertificateKeys[i]".to_string(), true, false),
            ("clientCertificateSecrets[i]".to_string(), false, true),
        ],
        "Crypto User on the keys that stay in the vault, Secrets User on the exportable ones' secrets: {grants:#?}"
    );
    // Each list is its own: a certificate named in one gets nothing meant for the other.
    assert!(module.contains("for (name, i) in keyCertificateNames"));
    assert!(module.contains("for (name, i) in exportableCertificateNames"));
    let main = crate::read("infra/main.bicep");
    assert!(main.contains("keyCertificateNames: clientCertificateNames"));
    assert!(main.contains("exportableCertificateNames: exportableClientCertificateNames"));
}
