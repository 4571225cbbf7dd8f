//! The optional shared token tier: Azure Managed Redis that only Entra identities reach, over
//! TLS 1.2, with the broker's identity let in by an access policy assignment, the encryption
//! key readable by the broker, the settings broker.toml needs, and nothing of it by default.

use crate::{bicep, read};

#[test]
fn the_shared_cache_is_entra_only_over_tls_and_lets_the_broker_in() {
    let clusters = bicep::resources_of("Microsoft.Cache/redisEnterprise");
    assert_eq!(clusters.len(), 1, "{clusters:?}");
    assert_eq!(
        clusters[0].property("minimumTlsVersion").as_deref(),
        Some("'1.2'")
    );
    let databases = bicep::resources_of("Microsoft.Cache/redisEnterprise/databases");
    assert_eq!(databases.len(), 1, "{databases:?}");
    let database = &databases[0];
    assert_eq!(
        database.property("parent"),
        Some(clusters[0].symbol.clone())
    );
    assert_eq!(
        database.property("accessKeysAuthentication").as_deref(),
        Some("'Disabled'"),
        "access keys disabled: Entra only"
    );
    assert_eq!(
        database.property("clientProtocol").as_deref(),
        Some("'Encrypted'")
    );
    let assignments =
        bicep::resources_of("Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments");
    assert_eq!(assignments.len(), 1, "{assignments:?}");
    assert_eq!(
        assignments[0].property("parent"),
        Some(database.symbol.clone())
    );
    assert!(
        assignments[0].body.contains("objectId: principalId"),
        "{}",
        assignments[0].body
    );
    let main = read("infra/main.bicep");
    assert!(
        main.contains("principalId: identity.properties.principalId"),
        "the broker's identity is the one let in"
    );
}

#[test]
fn the_shared_cache_is_off_by_default_and_sets_what_broker_toml_reads() {
    assert!(
        bicep::param("infra/main.bicep", "sharedCache").ends_with("param sharedCache bool = false")
    );
    let main = read("infra/main.bicep");
    let module = main
        .split("module redis 'modules/shared-cache.bicep' = ")
        .nth(1)
        .expect("the shared cache module");
    assert!(module.starts_with("if (sharedCache)"), "{module}");
    // The key is a Key Vault secret the broker may read once the tier is on.
    assert!(main.contains(
        "secretNames: sharedCache ? union(clientSecretNames, [sharedCacheKeySecretName]) : clientSecretNames"
    ));
    // The commented [shared_cache] block of the shipped configuration reads these settings.
    let shipped = read("infra/broker.toml");
    let block: String = shipped
        .lines()
        .skip_while(|line| *line != "# [shared_cache]")
        .map(|line| line.trim_start_matches("# ").to_string() + "\n")
        .collect();
    let table: toml::Value = toml::from_str(&block).expect("the commented block is TOML");
    let shared = &table["shared_cache"];
    assert_eq!(shared["auth"].as_str(), Some("entra"));
    assert_eq!(
        shared["encryption_key"]["key_vault_secret"].as_str(),
        Some("token-cache-key")
    );
    for setting in ["REDIS_URL", "AZURE_PRINCIPAL_ID"] {
        assert!(block.contains(&format!("${{{setting}}}")), "{setting}");
        assert!(
            main.contains(&format!("{setting}: ")),
            "main.bicep sets {setting}"
        );
    }
    assert!(
        bicep::param("infra/main.bicep", "sharedCacheKeySecretName").contains("'token-cache-key'")
    );
}
